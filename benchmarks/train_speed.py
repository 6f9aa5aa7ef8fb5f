"""Training throughput: aecli's engine against a plain textbook PyTorch loop, in one run.

Both train the same architecture (built from the preset) on the same data with the same loss,
optimiser and batch size. The textbook loop is what tutorials write: a Dataset of PIL images
with torchvision's per-item ToTensor (and Normalize), a DataLoader with default settings and
fp32. aecli's figure is its own training time (validation and file writing excluded).

    python benchmarks/train_speed.py                 # CPU (or CUDA when present)
    python benchmarks/train_speed.py --device cuda --steps 300 --repeats 5

It also prints the host's work per training step from torch.profiler: top-level aten operations
(the same count on every device) and, on CUDA, kernel launches, and the MFU on GPUs whose peak
aecli knows. On CUDA both presets also train at `--large-batch` (default 1024; 0 leaves the rows
out) on more of the same data (the digits 16 times over, 32,768 shapes), aecli alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from aecli.config import load_config
from aecli.data import ImageData, load_data, split
from aecli.devices import describe, deterministic, resolve_device
from aecli.engine import Trainer
from aecli.models import build_model
from aecli.run.training import trainer_in


def digits_28() -> ImageData:
    """scikit-learn's 1,797 real handwritten digits, upsampled to 28x28."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype("float32") / 16.0)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(images, torch.from_numpy(digits.target), None, {"kind": "digits"})


def aecli_speed(
    preset: str, data: ImageData, steps: int, device: torch.device, extra=()
) -> tuple[float, float | None]:
    """aecli's images/s past the first epoch, and the MFU it means (None where the device's
    peak is not known: the CPU, an unlisted GPU)."""
    config = load_config(preset, ["train.grid_images=0", *extra]).config
    train_n = len(split(data, config.data.val_fraction, config.train.seed)[0])
    per_epoch = -(-train_n // config.train.batch_size)
    epochs = max(2, -(-steps // per_epoch))
    config = load_config(preset, ["train.grid_images=0", f"train.epochs={epochs}", *extra]).config
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_in(config, data, Path(tmp), preset=preset, device=device)
        result = trainer.fit()
    # drop the first epoch (warm-up: allocator, autotuning), as for the textbook loop
    rest = result.history[1:]
    speed = sum(r["images_per_s"] * r["seconds"] for r in rest) / sum(r["seconds"] for r in rest)
    return speed, (speed * trainer.step_flops / trainer.peak if trainer.peak else None)


class TextbookDataset(torch.utils.data.Dataset):
    """PIL images converted per item, as torchvision tutorials do."""

    def __init__(self, images: torch.Tensor, symmetric: bool):
        from torchvision import transforms

        array = images.permute(0, 2, 3, 1).numpy()
        self.images = [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in array]
        steps = [transforms.ToTensor()]
        if symmetric:
            channels = images.shape[1]
            steps.append(transforms.Normalize([0.5] * channels, [0.5] * channels))
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def device_profile(cuda: bool):
    """torch.profiler over the host's operations and, on a GPU, its kernels."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])


def profiled_epoch(trainer: Trainer):
    """device_profile over one training epoch after a warm-up epoch, with cuDNN autotuning as
    fit() sets it; returns the profile and the epoch's wall-clock seconds (with the profiler's
    overhead)."""
    cuda = trainer.device.type == "cuda"
    with deterministic(False, autotune=cuda):
        trainer._train_epoch()  # warm-up
        trainer.state.batch = 0
        with device_profile(cuda) as prof:
            started = time.perf_counter()
            trainer._train_epoch()
            if cuda:
                torch.cuda.synchronize(trainer.device)
            seconds = time.perf_counter() - started
    return prof, seconds


def work_per_step(
    preset: str, data: ImageData, device: torch.device, extra=()
) -> tuple[float, float | None]:
    """Operations the host dispatches per training step (top-level aten calls: forward, loss,
    optimiser and bookkeeping) and, on CUDA, kernel and graph launches per step, from
    torch.profiler over one epoch."""
    config = load_config(preset, ["train.grid_images=0", "train.epochs=1", *extra]).config
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_in(config, data, Path(tmp), preset=preset, device=device)
        prof, _ = profiled_epoch(trainer)
    steps = trainer.steps_per_epoch
    events = prof.events()
    ops = sum(1 for e in events if e.cpu_parent is None and e.name.startswith("aten::"))
    launches = None
    if trainer.device.type == "cuda":
        kernels = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")
        launches = sum(1 for e in events if e.name in kernels) / steps
    return ops / steps, launches


def textbook_speed(preset: str, data: ImageData, steps: int, device: torch.device) -> float:
    config = load_config(preset).config
    train_part, _ = split(data, config.data.val_fraction, config.train.seed)
    dataset = TextbookDataset(train_part.images, config.data.range == "symmetric")
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train.batch_size, shuffle=True)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    done, images, seconds = 0, 0, 0.0
    warmup = len(loader)  # the first epoch is warm-up, as for aecli
    while done < steps + warmup:
        started = time.perf_counter()
        for x in loader:
            x = x.to(device)
            out = model(x)
            if config.loss.reconstruction == "bce":
                loss = F.binary_cross_entropy_with_logits(out.raw, x)
            else:
                loss = F.mse_loss(out.image, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done > warmup:
                images += len(x)
            if done >= steps + warmup:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if done > warmup:
            seconds += time.perf_counter() - started
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--large-batch",
        type=int,
        default=None,
        help="also train at this batch size, aecli alone (default: 1024 on CUDA, none on the CPU)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    large = args.large_batch if args.large_batch is not None else (1024 if cuda else 0)
    print(
        f"device: {describe(device)}; torch {torch.__version__}; {args.steps} steps, "
        f"median of {args.repeats}"
    )
    digits = digits_28()
    cifar_data = load_data(None, load_config("cifar-cae").config.data, seed=0)
    # (preset, its data, what the data is, overrides, whether the textbook loop runs too)
    rows = [
        ("mnist-cae", digits, "digits 28x28 (1797)", [], True),
        ("cifar-cae", cifar_data, "shapes 32x32 (2048)", [], True),
    ]
    if large:
        many = ["data.builtin_count=32768"]
        big_cifar = load_data(None, load_config("cifar-cae", many).config.data, seed=0)
        many_digits = ImageData(digits.images.repeat(16, 1, 1, 1), None, None, digits.source)
        batch = [f"train.batch_size={large}"]
        rows += [
            (f"mnist-cae b{large}", many_digits, "digits x16 (28752)", batch, False),
            (f"cifar-cae b{large}", big_cifar, "shapes 32x32 (32768)", batch, False),
        ]
    print(
        f"{'preset':<23} {'data':<22} {'aecli img/s':>12} {'textbook img/s':>15} {'ratio':>7} "
        f"{'ops/step':>9} {'launches/step':>14} {'MFU':>6}"
    )
    # on CUDA, also with the step replayed as one CUDA graph
    variants = [("", [])]
    if cuda:
        variants.append((" +graph", ["train.cuda_graph=true"]))
    for name, data, label, overrides, textbook in rows:
        preset = name.split()[0]
        for suffix, extra in variants:
            extra = [*overrides, *extra]
            ours, theirs, mfus = [], [], []
            for _ in range(args.repeats):
                a, use = aecli_speed(preset, data, args.steps, device, extra)
                ours.append(a)
                mfus.append(use)
                if textbook:
                    theirs.append(textbook_speed(preset, data, args.steps, device))
            ops, launches = work_per_step(preset, data, device, extra)
            use = None if None in mfus else statistics.median(mfus)
            # the ratio is the median of each repeat's own ratio (the two ran side by side)
            ratios = [a / b for a, b in zip(ours, theirs, strict=False)]
            ratio = statistics.median(ratios) if ratios else None
            print(
                f"{name + suffix:<23} {label:<22} {statistics.median(ours):>12.0f} "
                f"{f'{statistics.median(theirs):.0f}' if theirs else '-':>15} "
                f"{'-' if ratio is None else f'{ratio:.2f}x':>7} "
                f"{ops:>9.1f} {'-' if launches is None else f'{launches:.1f}':>14} "
                f"{'-' if use is None else f'{use:.2%}':>6}"
            )


if __name__ == "__main__":
    main()

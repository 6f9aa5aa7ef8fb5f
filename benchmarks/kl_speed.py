"""Training speed of cat-kl-f8 (the latent-diffusion kl-f8 VAE, 84M parameters): aecli's engine
against diffusers' `AutoencoderKL` of the same layout in a plain bf16 loop, and the MFU of each.

Both train on the same 256x256 crops of scikit-learn's sample photos with the same loss, L1 +
KL at cat-kl-f8's weight (no LPIPS: its VGG16 weights are a download; no discriminator: it starts
at step 50001), Adam at the same learning rate and the same batch size. The diffusers loop runs
three ways: eager on contiguous tensors, eager on channels-last, and `torch.compile` on
channels-last (the fastest loop issue 13 found). aecli runs its own execution policy
(`train.precision` and `train.memory_format: auto`), optionally with more `--set` overrides.
Images/s exclude warm-up steps (allocation, autotuning, compilation: aecli's first epoch of
`--steps` steps, the loops' first `--warmup`); MFU is images/s
x 3 x the forward FLOPs (torch.utils.flop_counter) over the GPU's dense peak for the precision
(bf16 here). Medians of `--repeats` runs, all in one process. `--profile N` then prints where
a step's time goes in aecli and in the eager diffusers loop: the N busiest kernels and, on CUDA,
how much of the step the GPU is busy.

    python benchmarks/kl_speed.py --device cuda                     # 256x256, batches 16 and 32
    python benchmarks/kl_speed.py --device cuda --set train.cuda_graph=true
    python benchmarks/kl_speed.py --device cpu --size 64 --batch 2 --steps 2 --warmup 1
    python benchmarks/kl_speed.py --device cuda --batch 16 --repeats 0 --profile 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import photo_crops  # noqa: E402
from train_speed import device_profile, profiled_epoch  # noqa: E402

from aecli.config import load_config  # noqa: E402
from aecli.data import ImageData  # noqa: E402
from aecli.devices import describe, peak_flops, resolve_device  # noqa: E402
from aecli.engine import Trainer
from aecli.io.vae_files import layout_of_config  # noqa: E402
from aecli.models import forward_flops  # noqa: E402
from aecli.run.training import trainer_in  # noqa: E402


def kl_config(size: int, batch: int, epochs: int, extra: list[str]):
    return load_config(
        "cat-kl-f8",
        [
            f"data.image_size={size}",
            f"train.batch_size={batch}",
            f"train.epochs={epochs}",
            "loss.perceptual_weight=0",
            "loss.disc_weight=0",
            "train.grid_images=0",
            "train.log_every=1000000",
            *extra,
        ],
    ).config


def kl_trainer(images: torch.Tensor, args, batch: int, steps: int, run_dir: Path) -> Trainer:
    """aecli's trainer for cat-kl-f8 on epochs of `steps` steps, validating on one batch."""
    data = images[: batch * (steps + 1)]
    config = kl_config(args.size, batch, 2, [f"data.val_fraction={1 / (steps + 1)}", *args.set])
    return trainer_in(
        config,
        ImageData(data, None, None, {"kind": "photo crops"}),
        run_dir,
        preset="cat-kl-f8",
        device=args.device,
    )


def aecli_speed(images: torch.Tensor, args, batch: int) -> float:
    """aecli's training images/s: `--steps` steps of warm-up (epoch 1), then `--steps` timed
    (epoch 2), validation on one batch between them (not timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        history = kl_trainer(images, args, batch, args.steps, Path(tmp)).fit().history
    return history[-1]["images_per_s"]


def diffusers_speed(images: torch.Tensor, args, batch: int, variant: str) -> float:
    """images/s of a plain training loop over diffusers' AutoencoderKL (`--warmup` steps, then
    `--steps` timed)."""
    run, batches = diffusers_loop(images, args, batch, variant)
    train_steps(run, batches, args.warmup, args)
    return batch * args.steps / train_steps(run, batches, args.steps, args)


def train_steps(run, batches: list[torch.Tensor], steps: int, args) -> float:
    """`steps` steps of a loop over `batches`, waited for; the seconds they took."""
    start = time.perf_counter()
    for i in range(steps):
        run(batches[i % len(batches)])
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
    return time.perf_counter() - start


def diffusers_loop(images: torch.Tensor, args, batch: int, variant: str):
    """A plain training step over diffusers' AutoencoderKL with the same layout and loss, and
    the batches it trains on."""
    import diffusers

    device = args.device
    config = kl_config(args.size, batch, 1, [])
    layout, _ = layout_of_config(config)
    torch.manual_seed(0)
    settings = {k: v for k, v in layout.diffusers_config().items() if k != "_class_name"}
    vae = diffusers.AutoencoderKL(**settings).to(device)
    layout_format = torch.contiguous_format if variant == "eager" else torch.channels_last
    vae = vae.to(memory_format=layout_format)
    optimizer = torch.optim.Adam(
        vae.parameters(), lr=config.optim.lr, **({"fused": True} if device.type == "cuda" else {})
    )
    kl_weight = config.loss.kl_weight
    cuda = device.type == "cuda"

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample()
            image = vae.decode(z).sample
        loss = (image.float() - x).abs().mean() + kl_weight * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    run = torch.compile(step) if variant == "compiled" else step
    x_all = (images.to(device).float() / 127.5 - 1).contiguous(memory_format=layout_format)
    return run, [x_all[i : i + batch] for i in range(0, len(x_all) - batch + 1, batch)]


PROFILED_STEPS = 3


def print_profile(images: torch.Tensor, args, batch: int, rows: int) -> None:
    """Where a step's time goes, for aecli and for the eager diffusers loop: the `rows` kernels
    with the most GPU time (operations with the most CPU time on the CPU) over PROFILED_STEPS
    steps, after warm-up, and on CUDA how much of the step the GPU is busy."""
    from torch.autograd import DeviceType

    cuda = args.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = kl_trainer(images, args, batch, PROFILED_STEPS, Path(tmp))
        tables = {"aecli": profiled_epoch(trainer)}
    run, batches = diffusers_loop(images, args, batch, "eager")
    train_steps(run, batches, args.warmup, args)
    with device_profile(cuda) as prof:
        seconds = train_steps(run, batches, PROFILED_STEPS, args)
    tables["diffusers eager"] = (prof, seconds)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    for name, (prof, seconds) in tables.items():
        averages = prof.key_averages()
        step_ms = seconds / PROFILED_STEPS * 1e3
        line = f"\nprofile: {name}, batch {batch}, {step_ms:.1f} ms per step (profiled)"
        if cuda:
            kernels = (
                e
                for e in averages
                if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            )
            busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / PROFILED_STEPS
            line += f"; GPU busy {busy_ms:.1f} ms of it ({busy_ms / step_ms:.0%})"
        print(f"{line}; per {PROFILED_STEPS} steps:")
        print(averages.table(sort_by=key, row_limit=rows))


def print_speeds(images: torch.Tensor, args, batches: list[int], flops: float, peak) -> None:
    """The table: images/s, MFU and aecli's ratio to each loop, medians of `--repeats` runs."""
    print(f"{'batch':>5} {'loop':<26} {'img/s':>9} {'MFU':>7} {'aecli / it':>11}")
    variants = [v for v in args.variants.split(",") if v]
    for batch in batches:
        runs: dict[str, list[float]] = {"aecli": []} | {v: [] for v in variants}
        for _ in range(args.repeats):
            runs["aecli"].append(aecli_speed(images, args, batch))
            for variant in variants:
                runs[variant].append(diffusers_speed(images, args, batch, variant))
        ours = statistics.median(runs["aecli"])
        for name, speeds in runs.items():
            speed = statistics.median(speeds)
            use = f"{speed * 3 * flops / peak:.1%}" if peak else "-"
            label = "aecli" if name == "aecli" else f"diffusers {name.replace('_', '-')}"
            ratio = "" if name == "aecli" else f"{ours / speed:.2f}x"
            print(f"{batch:>5} {label:<26} {speed:>9.1f} {use:>7} {ratio:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, action="append", help="default: 16 and 32")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="aecli preset overrides")
    parser.add_argument(
        "--variants", default="eager,channels_last,compiled", help="diffusers loops to run"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="then print the N busiest kernels of aecli's step and the eager diffusers step, "
        "at the first batch size (--repeats 0: only that)",
    )
    args = parser.parse_args()
    device = args.device = resolve_device(args.device)  # resolved once, passed on as it is
    batches = args.batch or [16, 32]
    images, _ = photo_crops(args.size, max(batches) * (args.steps + 1), 1)
    flops = forward_flops(kl_config(args.size, 1, 1, []))
    peak = peak_flops(device, torch.bfloat16)
    print(
        f"device: {describe(device)}; torch {torch.__version__}; cat-kl-f8 at {args.size}x"
        f"{args.size}, {flops / 1e9:.1f} GFLOPs forward per image; {args.steps} timed steps "
        f"after {args.warmup}; median of {args.repeats}"
        + (f"; aecli with {' '.join(args.set)}" if args.set else "")
    )
    if args.repeats:
        print_speeds(images, args, batches, flops, peak)
    if args.profile:
        print_profile(images, args, batches[0], args.profile)


if __name__ == "__main__":
    main()

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
(bf16 here). Medians of `--repeats` runs, all in one process.

    python benchmarks/kl_speed.py --device cuda                     # 256x256, batches 16 and 32
    python benchmarks/kl_speed.py --device cuda --set train.cuda_graph=true
    python benchmarks/kl_speed.py --device cpu --size 64 --batch 2 --steps 2 --warmup 1
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

from aecli.config import load_config  # noqa: E402
from aecli.data import ImageData  # noqa: E402
from aecli.devices import describe, peak_flops, resolve_device  # noqa: E402
from aecli.engine import Trainer  # noqa: E402
from aecli.io.vae_files import layout_of_config  # noqa: E402
from aecli.models import forward_flops  # noqa: E402


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


def aecli_speed(images: torch.Tensor, args, batch: int) -> float:
    """aecli's training images/s: `--steps` steps of warm-up (epoch 1), then `--steps` timed
    (epoch 2), validation on one batch between them (not timed)."""
    data = images[: batch * (args.steps + 1)]
    config = kl_config(
        args.size, batch, 2, [f"data.val_fraction={1 / (args.steps + 1)}", *args.set]
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            config,
            ImageData(data, None, None, {"kind": "photo crops"}),
            Path(tmp),
            preset="cat-kl-f8",
            device=args.device,
        )
        history = trainer.fit().history
    return history[-1]["images_per_s"]


def diffusers_speed(images: torch.Tensor, args, batch: int, variant: str) -> float:
    """A plain training loop over diffusers' AutoencoderKL with the same layout and loss."""
    import diffusers

    device = torch.device(args.device)
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
    batches = [x_all[i : i + batch] for i in range(0, len(x_all) - batch + 1, batch)]
    for i in range(args.warmup):
        run(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        run(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize(device)
    return batch * args.steps / (time.perf_counter() - start)


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
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.device = str(device)
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


if __name__ == "__main__":
    main()

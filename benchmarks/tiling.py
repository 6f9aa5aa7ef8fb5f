"""Exact tiles against untiled, against --tile-fast and against diffusers' enable_tiling(), on
the same weights and the same photo.

Two models of the Stable Diffusion VAE layout (factor 8, GroupNorm, mid-block attention):

- random: a diffusers AutoencoderKL at random initialisation, widths 32-32-64-64, one
  ResNet block per level, saved with save_pretrained and read by aecli from that folder;
- trained: widths 16-32-32-32, trained by aecli for --epochs on 64x64 crops of scikit-learn's
  two sample photos, then exported with `aecli export --format diffusers` for diffusers.

Each reconstructs the first sample photo resized to --size (default 1000x744): untiled, and in
tiles of --tile pixels (aecli's exact tiles, aecli --tile-fast, diffusers enable_tiling() with
tile_sample_min_size = --tile and its default overlap). Printed per method: PSNR of the
reconstruction against the same implementation's untiled one, the largest difference of the
latents (posterior means) from untiled, seconds (median of --repeats after a warm-up), that
time against untiled, and peak memory: the growth of the process's resident high-water mark
(VmHWM) on the CPU, torch.cuda.max_memory_allocated on CUDA. Every case runs in its own process.

--large (for a GPU): decodes a 512x512 latent (a 4096x4096 image) with the full-size SD VAE
layout (widths 128-256-512-512, two ResNet blocks per level; random weights) through aecli's
automatic tiling, as it starts where the device has --free-gb GB free, and through diffusers'
enable_tiling() with tiles of 512; seconds and peak device memory.

Run: python benchmarks/tiling.py [--epochs 6] [--device cpu] [--tile 256] [--repeats 3]
     python benchmarks/tiling.py --large --device cuda [--free-gb 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RANDOM = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}
FULL = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}
METHODS = ["aecli untiled", "aecli exact tiles", "aecli --tile-fast", "diffusers untiled",
           "diffusers enable_tiling()"]  # fmt: skip


def peak_rss() -> int:
    """This process's resident high-water mark (VmHWM), bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def photo(size: tuple[int, int]) -> torch.Tensor:
    """scikit-learn's first sample photo resized to (H, W), uint8 (1, 3, H, W)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    image = Image.fromarray(load_sample_images().images[0]).resize(size[::-1])
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]


def diffusers_vae(folder: Path, device: torch.device, tile: int | None):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).to(device).eval()
    if tile is not None:
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae


def case(args) -> None:
    """One method in this process: its outputs to --result (.npz), its figures to stdout."""
    device = torch.device(args.device)
    image = photo(tuple(args.size))
    method = args.case
    if method.startswith("aecli"):
        from aecli.inference import Predictor

        predictor = Predictor(args.weights, device)
        if method == "aecli untiled":
            predictor.set_tiling(0, None, 1)
        else:
            predictor.set_tiling(args.tile, None, 8, fast=method == "aecli --tile-fast")

        def latents():
            return predictor.encode(image)

        def reconstruct():
            return predictor.reconstruct(image)
    else:
        vae = diffusers_vae(args.weights, device, args.tile if "tiling" in method else None)
        x = image.to(device).float() / 127.5 - 1

        @torch.inference_mode()
        def latents():
            return vae.encode(x).latent_dist.mode()

        @torch.inference_mode()
        def reconstruct():
            z = vae.encode(x).latent_dist.mode()
            return ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    base = peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    z = latents().float().cpu()
    out = reconstruct().cpu()  # the warm-up
    seconds = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        reconstruct()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss() - base
    np.savez(args.result, image=out.numpy(), latents=z.numpy())
    print(json.dumps({"seconds": statistics.median(seconds), "peak": peak}))


def run_case(method: str, weights: Path, args, work: Path) -> dict:
    result = work / f"{method.replace(' ', '_').replace('()', '')}.npz"
    command = [sys.executable, __file__, "--case", method, "--weights", str(weights),
               "--result", str(result), "--device", args.device, "--tile", str(args.tile),
               "--repeats", str(args.repeats), "--size", *map(str, args.size)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    saved = np.load(result)
    return {**figures, "image": saved["image"], "latents": saved["latents"]}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def trained_folder(work: Path, args) -> Path:
    """An aecli model of the SD layout trained on crops of the sample photos, in diffusers'
    format."""
    import yaml
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from aecli.config import load_config
    from aecli.data import load_data
    from aecli.io.vae_files import KLLayout
    from aecli.run.training import train

    crops = work / "crops"
    crops.mkdir()
    rng = np.random.default_rng(0)
    images = load_sample_images().images
    for i in range(800):
        image = images[i % 2]
        y, x = rng.integers(0, image.shape[0] - 64), rng.integers(0, image.shape[1] - 64)
        Image.fromarray(image[y : y + 64, x : x + 64]).save(crops / f"{i:04d}.png")
    raw = KLLayout(3, 3, (16, 32, 32, 32), 1, 4, norm_groups=8, sample_size=64).raw_config()
    raw["optim"]["lr"] = 1e-3
    raw["train"] = {"epochs": args.epochs, "batch_size": 16}
    (work / "kl.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(str(work / "kl.yaml")).config
    start = time.perf_counter()
    trained = train(config, load_data(crops, config.data, 0), work / "run", preset="kl",
                    device=args.device)  # fmt: skip
    print(
        f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s: "
        f"val_psnr {trained.final['val_psnr']:.2f} dB"
    )
    folder = work / "trained"
    export = ["export", str(trained.weights), "-o", str(folder), "--format", "diffusers"]
    subprocess.run([sys.executable, "-m", "aecli", *export], check=True, capture_output=True)
    return folder


def random_folder(work: Path, layout: dict) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = len(layout["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        **layout,
    )
    folder = work / f"random-{layout['block_out_channels'][-1]}"
    vae.save_pretrained(folder)
    return folder


def compare(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="aecli-tiling-"))
    models = {"random init": random_folder(work, RANDOM), "trained": trained_folder(work, args)}
    h, w = args.size
    print(
        f"\nreconstructing a {w}x{h} photo on {args.device}, tiles of {args.tile}; each method "
        f"against its own untiled output; median of {args.repeats} runs\n"
    )
    print("| model | method | PSNR vs untiled | latents: largest difference | seconds | "
          "time vs untiled | peak memory |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, folder in models.items():
        found = {method: run_case(method, folder, args, work) for method in METHODS}
        for method in METHODS:
            reference = found[method.split()[0] + " untiled"]
            mine = found[method]
            if mine is reference:
                quality, latents = "(reference)", "(reference)"
            else:
                quality = f"{psnr(mine['image'], reference['image']):.1f} dB"
                latents = f"{np.abs(mine['latents'] - reference['latents']).max():.2g}"
            ratio = mine["seconds"] / reference["seconds"]
            print(f"| {name} | {method} | {quality} | {latents} | {mine['seconds']:.2f} | "
                  f"{ratio:.2f}x | {mine['peak'] / 1e6:,.0f} MB |")  # fmt: skip


def large(args) -> None:
    """The GPU check: a 512x512 latent decoded through automatic tiling and diffusers'."""
    import aecli.inference.predictor as predictor_module
    from aecli.inference import Predictor

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="aecli-tiling-large-"))
    folder = random_folder(work, FULL)
    side = args.latent
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    print(f"decoding a {side}x{side} latent ({8 * side}x{8 * side} image), full SD VAE layout, "
          f"random weights, on {device}")  # fmt: skip
    real = predictor_module.available_memory
    limit = int(args.free_gb * 1e9)
    predictor_module.available_memory = lambda d: min(limit, real(d) or limit)
    predictor = Predictor(folder, device)
    vae = diffusers_vae(folder, device, 512)
    for label, run in (
        (f"aecli, automatic tiling as with {args.free_gb:g} GB free", lambda: predictor.decode(z)),
        ("diffusers enable_tiling(), tiles of 512", lambda: _diffusers_decode(vae, z)),
    ):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        memory = (
            f"peak device memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
            if device.type == "cuda"
            else f"peak RSS {peak_rss() / 1e9:.2f} GB (the process so far)"
        )
        print(f"  {label}: {seconds:.1f} s, {memory}")


@torch.inference_mode()
def _diffusers_decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z.to(vae.device)).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=[744, 1000], metavar=("H", "W"))
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--latent", type=int, default=512, help="--large: the latent's side")
    parser.add_argument("--free-gb", type=float, default=16.0)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case(args)
    elif args.large:
        large(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()

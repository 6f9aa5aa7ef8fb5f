"""Tiled reconstruction (--tile) against untiled, and its peak memory on a 4096x4096 image.

Trains a small model of the Stable Diffusion VAE layout (GroupNorm, mid-block attention,
downsampling factor 8; widths 16-32-32-32) on 64x64 crops of scikit-learn's two sample photos,
then reconstructs a 1024x768 photo with and without tiles, for that model and for the same
architecture at random initialisation. Peak memory: the process's peak resident memory
while reconstructing one 4096x4096 image in tiles, next to what the untiled pass would need in
activations (aecli's estimate). Run: python benchmarks/tiling.py [--epochs 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_sample_images

from aecli.config import load_config
from aecli.data import load_data
from aecli.engine import train
from aecli.inference import Predictor
from aecli.io.vae_files import KLLayout
from aecli.io.weights import save_weights
from aecli.models import build_model
from aecli.models.builder import activation_bytes, layers

LAYOUT = KLLayout(3, 3, (16, 32, 32, 32), 1, 4, norm_groups=8, sample_size=64)

PEAK = """
import sys, torch
from aecli.inference import Predictor


def peak():  # this process's own high-water mark (ru_maxrss keeps the parent's across exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


predictor = Predictor(sys.argv[1], sys.argv[2])
predictor.set_tiling(int(sys.argv[3]), None, 4)
base = peak()
predictor.reconstruct(torch.full((1, 3, 4096, 4096), 128, dtype=torch.uint8))
print(base, peak())
if predictor.device.type == "cuda":
    print(torch.cuda.max_memory_allocated(predictor.device))
"""


def crops(folder: Path, count: int = 800, size: int = 64) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = load_sample_images().images
    for i in range(count):
        image = images[i % 2]
        y, x = rng.integers(0, image.shape[0] - size), rng.integers(0, image.shape[1] - size)
        Image.fromarray(image[y : y + size, x : x + size]).save(folder / f"{i:04d}.png")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * np.log10(255.0**2 / (a.float() - b.float()).pow(2).mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aecli-tiling-"))
    crops(work / "crops")
    raw = LAYOUT.raw_config()
    raw["optim"]["lr"] = 1e-3
    raw["train"] = {"epochs": args.epochs, "batch_size": 16}
    (work / "kl.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(str(work / "kl.yaml")).config
    start = time.perf_counter()
    trained = train(
        config,
        load_data(work / "crops", config.data, 0),
        work / "run",
        preset="kl",
        device=args.device,
    )
    print(
        f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s: "
        f"val_psnr {trained.final['val_psnr']:.2f} dB"
    )
    torch.manual_seed(0)
    save_weights(work / "random.safetensors", build_model(config), config, preset="kl",
                 data={}, class_names=None, metrics={})  # fmt: skip
    photo = Image.fromarray(load_sample_images().images[0]).resize((1024, 768))
    image = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None]
    print("\ntiled vs untiled reconstruction of a 1024x768 photo (PSNR, dB; time, s)")
    for name, weights in (
        ("trained", trained.weights),
        ("random init", work / "random.safetensors"),
    ):
        predictor = Predictor(weights, args.device)
        start = time.perf_counter()
        whole = predictor.reconstruct(image)
        untiled = time.perf_counter() - start
        cells = [f"untiled {untiled:.1f} s"]
        for tile in (256, 512):
            predictor.set_tiling(tile, None, 4)
            start = time.perf_counter()
            tiles = predictor.reconstruct(image)
            cells.append(
                f"tile {tile}: {psnr(tiles, whole):.1f} dB {time.perf_counter() - start:.1f} s"
            )
            predictor.tiling = None
        print(f"  {name:12s} " + "; ".join(cells))
    need = activation_bytes(layers(config, (4096, 4096)))
    print(f"\n4096x4096 image: untiled activations about {need / 1e9:.1f} GB (estimate)")
    for tile in (256, 512):
        run = subprocess.run(
            [sys.executable, "-c", PEAK, str(trained.weights), args.device, str(tile)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        figures = [int(v) for v in run.stdout.split()]
        line = (
            f"  tile {tile}: peak RSS {figures[1] / 1e9:.2f} GB "
            f"({figures[0] / 1e9:.2f} GB with the model loaded, before the image)"
        )
        if len(figures) > 2:
            line += f", CUDA max allocated {figures[2] / 1e9:.2f} GB"
        print(line)


if __name__ == "__main__":
    main()

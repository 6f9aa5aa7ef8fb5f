"""Batch reconstruction throughput: `aecli reconstruct` against a plain per-file loop.

A folder of JPEGs (crops of scikit-learn's two sample photos, 96 to 192 pixels a side) is
written to a temp dir and reconstructed three ways, in one run:

- aecli: `reconstruct_files`, the core of `aecli reconstruct` (DataLoader workers decoding,
  batches under inference_mode, PNGs written on threads);
- a plain loop, as a script would do it: per file open, resize, ToTensor, the model on a
  batch of 1 under no_grad, save the PNG with Pillow's default settings;
- the model alone, on the same images already decoded and resized, in batches: one ceiling;
- aecli's path with the model taken out (decoding, copies to the device and back, PNG writing):
  the other ceiling, the work per file that no speed of the model removes.

The model has the preset's architecture with its initial weights: speed does not depend on
training. `aecli reconstruct` from a shell is also timed once per preset, start-up included.

    python benchmarks/reconstruct_speed.py
    python benchmarks/reconstruct_speed.py --images 10000 --device cuda --dir /dev/shm

On CUDA it also prints the model-alone rate's MFU and the kernel launches per batch.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aecli.config import load_config
from aecli.data.images import fit_image, read_image
from aecli.devices import describe, resolve_device
from aecli.inference import Predictor, collect_inputs, plan_outputs, reconstruct_files
from aecli.io.atomic import atomic_write_bytes
from aecli.io.images import BATCH_COMPRESS_LEVEL, png_bytes
from aecli.io.weights import save_weights
from aecli.models import build_model


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = rng.integers(96, 193, 2)
        top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
        crop = photo[top : top + h, left : left + w]
        Image.fromarray(crop).save(folder / f"{i:05d}.jpg", quality=90)


def write_weights(preset: str, path: Path) -> None:
    config = load_config(preset).config
    torch.manual_seed(0)
    save_weights(
        path, build_model(config), config, preset=preset, data={}, class_names=None, metrics={}
    )


def aecli_speed(
    predictor: Predictor, folder: Path, out: Path, workers: int | None, batch: int
) -> float:
    shutil.rmtree(out, ignore_errors=True)
    files, _ = collect_inputs([folder])
    start = time.perf_counter()
    result = reconstruct_files(
        predictor, files, plan_outputs(files, out), workers=workers, batch_size=batch
    )
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    seconds = time.perf_counter() - start
    assert len(result.rows) == len(files) and not result.failures
    return len(files) / seconds


def no_model_speed(
    predictor: Predictor, folder: Path, out: Path, workers: int | None, batch: int
) -> float:
    """aecli's path with the model taken out: each batch's input images are its output."""
    predictor.reconstruct = lambda images: images  # the instance's, over the method
    try:
        return aecli_speed(predictor, folder, out, workers, batch)
    finally:
        del predictor.reconstruct


def per_file_costs(folder: Path, size: tuple[int, int], count: int = 300) -> str:
    """What one core spends per file on the path's own work (microseconds, on up to `count`
    files): decoding and resizing as aecli's workers do, PNG encoding and the file write as its
    writer threads do (save_png for a batch output, timed in its two parts). These bound the
    rate of any number of cores, however fast the model."""
    files = sorted(folder.iterdir())[:count]
    start = time.perf_counter()
    images = [fit_image(read_image(f, at_least=max(size)), size, "stretch") for f in files]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    data = [png_bytes(a, compress_level=BATCH_COMPRESS_LEVEL) for a in images]
    encode = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=folder.parent) as out:
        start = time.perf_counter()
        for i, d in enumerate(data):
            atomic_write_bytes(Path(out) / f"{i}.png", d, durable=False)
        write = time.perf_counter() - start
    per = [t / len(files) * 1e6 for t in (decode, encode, write)]
    return (
        f"per file on one core, {size[0]}x{size[1]}: decode+resize {per[0]:.0f} us, PNG encode "
        f"{per[1]:.0f} us, write {per[2]:.0f} us; {1e6 / sum(per):,.0f} files/s per core"
    )


def plain_loop_speed(predictor: Predictor, folder: Path, out: Path) -> float:
    from torchvision.transforms import functional as TF

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model, device = predictor.model, predictor.device
    h, w = predictor.size
    symmetric = predictor.value_range == "symmetric"
    files = sorted(folder.iterdir())
    start = time.perf_counter()
    with torch.no_grad():
        for file in files:
            image = Image.open(file).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
            x = TF.to_tensor(image)
            if symmetric:
                x = TF.normalize(x, [0.5] * 3, [0.5] * 3)
            y = model(x[None].to(device), sample=False).image[0].float().cpu()
            y = (y + 1) / 2 if symmetric else y
            TF.to_pil_image(y.clamp(0, 1)).save(out / f"{file.stem}.png")
    return len(files) / (time.perf_counter() - start)


def model_alone_speed(
    predictor: Predictor, images: torch.Tensor, batch_size: int, seconds: float = 1.0
) -> float:
    """The model on decoded images already on the device, batch after batch, over the images as
    many times as it takes to fill `seconds` (on a GPU one pass can take a few milliseconds)."""
    images = predictor.execution.to_device(images)
    predictor.reconstruct(images[:batch_size])  # warm-up
    cuda = predictor.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(predictor.device)
    start, passes, elapsed = time.perf_counter(), 0, 0.0
    while passes == 0 or elapsed < seconds:
        for i in range(0, len(images), batch_size):
            predictor.reconstruct(images[i : i + batch_size])
        if cuda:
            torch.cuda.synchronize(predictor.device)
        passes += 1
        elapsed = time.perf_counter() - start
    return passes * len(images) / elapsed


def launches_per_batch(predictor: Predictor, images: torch.Tensor, batch_size: int) -> float:
    """CUDA kernel launches per batch of the model alone, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    x = predictor.execution.to_device(images[:batch_size])
    predictor.reconstruct(x)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            predictor.reconstruct(x)
        torch.cuda.synchronize(predictor.device)
    kernels = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    return sum(1 for e in prof.events() if e.name in kernels) / 5


def mfu(predictor: Predictor, preset: str, images_per_s: float) -> float | None:
    """The model-alone rate's share of the GPU's peak for its precision (None on the CPU)."""
    from aecli.devices import peak_flops
    from aecli.models import forward_flops

    peak = peak_flops(predictor.device, predictor.execution.autocast_dtype)
    if peak is None:
        return None
    flops = forward_flops(load_config(preset).config)
    return images_per_s * flops / peak


def cli_seconds(weights: Path, folder: Path, out: Path, device: torch.device) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "aecli", "reconstruct", str(weights), str(folder), "-o", str(out)]
        + ["--device", str(device)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="default: aecli's own")
    parser.add_argument("--batch-size", type=int, default=None, help="default: aecli's own")
    parser.add_argument("--preset", action="append", help="default: cifar-cae and cifar-res")
    parser.add_argument(
        "--dir", default=None, help="where to write the files (e.g. /dev/shm to leave the disk out)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(
        f"device: {describe(device)}; torch {torch.__version__}; {args.images} JPEGs "
        f"96-192 px; median of {args.repeats}; files in {args.dir or tempfile.gettempdir()}"
    )
    print(
        f"{'preset':<10} {'batch':>6} {'aecli img/s':>12} {'plain loop':>11} {'ratio':>7} "
        f"{'model alone':>12} {'aecli/model':>12} {'no model':>9} {'CLI wall s':>11} {'MFU':>6} "
        f"{'launches/batch':>15}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        folder = tmp / "jpegs"
        write_jpegs(folder, args.images)
        for preset in args.preset or ["cifar-cae", "cifar-res"]:
            weights = tmp / f"{preset}.safetensors"
            write_weights(preset, weights)
            predictor = Predictor(weights, device)
            images = torch.stack(
                [
                    torch.from_numpy(fit_image(read_image(f), predictor.size, "stretch").copy())
                    for f in sorted(folder.iterdir())
                ]
            ).permute(0, 3, 1, 2)
            print(per_file_costs(folder, predictor.size))
            batch = predictor.batch_size(args.batch_size)  # aecli's default where not given
            ours, plain, alone, bare = [], [], [], []
            for _ in range(args.repeats):
                ours.append(aecli_speed(predictor, folder, tmp / "out", args.workers, batch))
                plain.append(plain_loop_speed(predictor, folder, tmp / "plain"))
                alone.append(model_alone_speed(predictor, images, batch))
                bare.append(no_model_speed(predictor, folder, tmp / "out", args.workers, batch))
            wall = cli_seconds(weights, folder, tmp / "cli", device)
            a, p, m, n = (statistics.median(v) for v in (ours, plain, alone, bare))
            use = mfu(predictor, preset, m)
            launches = (
                launches_per_batch(predictor, images, batch)
                if predictor.device.type == "cuda"
                else None
            )
            print(
                f"{preset:<10} {batch:>6} {a:>12.0f} {p:>11.0f} {a / p:>6.2f}x {m:>12.0f} "
                f"{a / m:>11.0%} {n:>9.0f} {wall:>11.2f} {'-' if use is None else f'{use:.1%}':>6} "
                f"{'-' if launches is None else f'{launches:.0f}':>15}"
            )


if __name__ == "__main__":
    main()

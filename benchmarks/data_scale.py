"""Streamed training at data-set scale: start-up time, peak memory, loader speed, training speed.

Writes N synthetic photo-like JPEGs of mixed sizes (shorter sides 256 to 512), as a folder and
as WebDataset shards of 1,000, and measures for each N:

- `first step`: seconds from `aecli train`'s start to its first training step (the first
  window record in metrics.jsonl, log_every 1), streamed from the folder and from the shards;
- `peak RSS`: the whole command's peak resident memory over one epoch (/usr/bin/time -v: the
  largest of the main process and its workers), and the same for the in-memory path where the
  set fits;
- `loader`: images/s of aecli's streamed loader alone (decode, resize, random crop, batches)
  over the first LOADER_IMAGES images, against a bare Pillow loop doing the same work with the
  same number of processes, and on the shards against the webdataset package's pipeline doing
  the same work (where it is installed);
- `train`: images/s of training streamed (random 48x48 crops of photos resized to 52-64) against
  in memory (centre crops), on the same images, for a model whose step costs more than decoding
  (TRAIN_PRESET, fully convolutional): the median of --repeats epochs.

    python benchmarks/data_scale.py                     # N = 2,000 and 20,000
    python benchmarks/data_scale.py --images 2000 --repeats 3
    python benchmarks/data_scale.py --images 200000 --dir /big/disk
    python benchmarks/data_scale.py --demo              # 26.5 GB of pixels through one epoch

Targets (2-core machine): peak memory at 20,000 within 10% of 2,000; first step under 10 s at
20,000; loader at least 80% of the bare loop; streamed training at least 90% of in memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

LOADER_IMAGES = 2000
CROP = 32
PRESET_ARGS = [
    "cifar-res",
    "--set",
    f"data.image_size={CROP}",
    "--set",
    "data.resize=[36,48]",
    "--set",
    "data.crop=random",
    "--batch-size",
    "32",
]


def photo(i: int) -> bytes:
    """A photo-like JPEG: smooth gradients, a few shapes and noise, 256 to 512 pixels a side."""
    rng = np.random.default_rng(i)
    h, w = (int(v) for v in rng.integers(256, 513, 2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-0.4, 0.4, (2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
        inside = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        pixels[inside] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def _write_range(args) -> None:
    folder, start, stop = args
    for i in range(start, stop):
        path = folder / f"{i // 1000:03d}" / f"{i:07d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(photo(i))


def write_data(root: Path, n: int) -> tuple[Path, Path]:
    """N JPEGs under root/folder (1,000 to a subfolder) and the same as root/shards/NNNNN.tar."""
    folder, shards = root / "folder", root / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    shards.mkdir(exist_ok=True)
    chunks = [(folder, s, min(n, s + 250)) for s in range(0, n, 250)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_range, chunks))
    for start in range(0, n, 1000):
        shard = shards / f"{start // 1000:05d}.tar"
        if shard.exists():
            continue
        with tarfile.open(shard.with_suffix(".tmp"), "w") as tar:
            for i in range(start, min(n, start + 1000)):
                tar.add(folder / f"{i // 1000:03d}" / f"{i:07d}.jpg", arcname=f"{i:07d}.jpg")
        shard.with_suffix(".tmp").rename(shard)
    return folder, shards


# For streamed against in-memory training: a fully convolutional residual model whose step
# (tens of ms an image on the 2-core machine) outweighs decoding (about 1 ms an image).
TRAIN_PRESET = """\
data: {image_size: 48, channels: 3, range: symmetric}
model:
  encoder:
    - {type: conv, out: 32, kernel: 3, padding: 1}
    - {type: resblock, out: 32, groups: 8}
    - {type: conv, out: 64, kernel: 3, stride: 2, padding: 1}
    - {type: resblock, out: 64, groups: 8}
    - {type: conv, out: 64, kernel: 3, stride: 2, padding: 1}
    - {type: resblock, out: 64, groups: 8}
  latent: {channels: 8}
  decoder:
    - {type: resblock, out: 64, groups: 8}
    - {type: upsample, factor: 2}
    - {type: conv, out: 64, kernel: 3, padding: 1}
    - {type: resblock, out: 64, groups: 8}
    - {type: upsample, factor: 2}
    - {type: conv, out: 32, kernel: 3, padding: 1}
    - {type: resblock, out: 32, groups: 8}
    - {type: conv, out: 3, kernel: 3, padding: 1}
  output: none
loss: {reconstruction: mse}
train: {batch_size: 32}
"""


# --demo: a run over more decoded pixels than the 2-core machine's 23 GiB: 15,000 photos cropped
# to 768x768 (26.5 GB), through a patch autoencoder cheap enough per pixel to finish an epoch.
DEMO_PRESET = """\
data: {image_size: 768, channels: 3, resize: 768, val_max: 100}
model:
  encoder:
    - {type: conv, out: 16, kernel: 8, stride: 8, padding: 0, act: relu}
  latent: {channels: 8}
  decoder:
    - {type: conv_transpose, out: 3, kernel: 8, stride: 8, padding: 0}
train: {epochs: 1, batch_size: 8, grid_images: 4}
"""


def demo(root: Path) -> None:
    """--demo: one epoch over the first 15 shards of 1,000 at 768x768, its time and peak RSS."""
    preset = root / "demo.yaml"
    preset.write_text(DEMO_PRESET)
    out = root / "run-demo"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.perf_counter()
    shards = root / "20000" / "shards" / "{00000..00014}.tar"
    result = timed_train(shards, out, [], [str(preset)])
    pixels = 15_000 * 3 * 768 * 768
    print(
        f"demo: 15,000 images at 768x768 ({pixels / 1e9:.1f} GB of pixels): "
        f"{result['epoch']['step']} steps in {time.perf_counter() - started:.0f} s, peak RSS "
        f"{result['peak_mb'] / 1024:.2f} GB, val_psnr {result['epoch']['val_psnr']:.1f} dB"
    )


def timed_train(data: Path, out: Path, extra: list[str], preset=None) -> dict:
    """One epoch of `aecli train` under /usr/bin/time -v: first-step time, peak RSS, img/s and
    the epoch's record."""
    preset = PRESET_ARGS if preset is None else preset
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "aecli",
        "train",
        *preset,
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--set",
        "train.log_every=1",
        "--set",
        "train.grid_images=0",
        *extra,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics, first = out / "metrics.jsonl", None
    while process.poll() is None:
        if first is None and metrics.exists() and metrics.stat().st_size:
            first = time.perf_counter() - started
        time.sleep(0.02)
    stderr = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"aecli train failed:\n{stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    epoch = next(r for r in epochs if r["kind"] == "epoch")
    return {"first": first, "peak_mb": peak / 1024, "speed": epoch["images_per_s"], "epoch": epoch}


def loader_speed(folder: Path, workers: int) -> float:
    """aecli's streamed loader alone over LOADER_IMAGES images: images/s."""
    from aecli.config import load_config
    from aecli.data.stream import batch_loader, open_stream

    config = load_config(PRESET_ARGS[0], [a for a in PRESET_ARGS[2:8:2]]).config.data
    config = config.model_copy(update={"workers": workers})
    data = open_stream(folder, config, None)
    order = data.epoch_order(0, 1)[:LOADER_IMAGES]
    batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    started = time.perf_counter()
    count = sum(
        len(images) for _, images, _, _ in batch_loader(data, batches, 0, 0, 1, pin_memory=False)
    )
    return count / (time.perf_counter() - started)


def shard_loader_speed(shards: Path, workers: int) -> float:
    """aecli's streamed loader over the shards' first LOADER_IMAGES images: images/s."""
    from aecli.config import load_config
    from aecli.data.shards import shard_paths
    from aecli.data.stream import batch_loader, open_stream

    config = load_config(PRESET_ARGS[0], PRESET_ARGS[2:8:2]).config.data
    config = config.model_copy(update={"workers": workers})
    data = open_stream(shards, config, shard_paths(shards))
    order = data.epoch_order(0, 1)
    order = order[np.isin(order, np.arange(LOADER_IMAGES))]
    batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    started = time.perf_counter()
    loader = batch_loader(data, batches, 0, 0, 1, pin_memory=False)
    count = sum(len(images) for _, images, _, _ in loader)
    return count / (time.perf_counter() - started)


def _webdataset_crop(sample):
    image = sample["jpg"]
    rng = np.random.default_rng()
    side = int(rng.integers(36, 49))
    scale = side / min(image.size)
    size = (max(CROP, round(image.width * scale)), max(CROP, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left = int(rng.integers(0, image.width - CROP + 1))
    top = int(rng.integers(0, image.height - CROP + 1))
    return np.asarray(image.crop((left, top, left + CROP, top + CROP)))


def webdataset_speed(shards: Path, workers: int) -> float | None:
    """The webdataset package's pipeline over the same shards (shuffled within a buffer,
    decoded with PIL, the same resize and random crop, batches of 32): images/s, or None
    where webdataset is not installed."""
    try:
        import webdataset as wds
    except ImportError:
        return None
    files = [str(p) for p in sorted(shards.glob("*.tar"))[: -(-LOADER_IMAGES // 1000)]]
    pipeline = (
        wds.WebDataset(files, shardshuffle=False, empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .map(_webdataset_crop)
        .batched(32)
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    started = time.perf_counter()
    count = sum(len(batch) for batch in loader)
    return count / (time.perf_counter() - started)


def _bare(paths: list[Path]) -> int:
    rng = np.random.default_rng(0)
    for path in paths:
        with Image.open(path) as image:
            image.draft("RGB", (36, 36))
            image = image.convert("RGB")
            side = int(rng.integers(36, 49))
            scale = side / min(image.size)
            image = image.resize(
                (max(CROP, round(image.width * scale)), max(CROP, round(image.height * scale))),
                Image.BICUBIC,
            )
            left = int(rng.integers(0, image.width - CROP + 1))
            top = int(rng.integers(0, image.height - CROP + 1))
            np.asarray(image.crop((left, top, left + CROP, top + CROP)))
    return len(paths)


def bare_speed(folder: Path, workers: int) -> float:
    """A bare Pillow loop (draft decode, resize, random crop) over the same images: images/s."""
    paths = sorted(folder.rglob("*.jpg"))[:LOADER_IMAGES]
    chunks = [paths[i::workers] for i in range(workers)]
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        count = sum(pool.map(_bare, chunks))
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/aecli-data-scale"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--demo", action="store_true", help="only the run over 26.5 GB of pixels (needs N=20,000)"
    )
    args = parser.parse_args()
    if args.demo:
        write_data(args.dir / "20000", 20000)
        demo(args.dir)
        return
    from aecli.data.dataset import default_workers

    workers = default_workers()
    print(
        f"{os.cpu_count()} cores, {workers} decoding worker(s); cifar-res at {CROP}x{CROP} "
        f"crops of photos resized to 36-48 pixels; one epoch per run"
    )
    rows = []
    for n in args.images:
        folder, shards = write_data(args.dir / str(n), n)
        for label, data in (("folder", folder), ("shards", shards)):
            out = args.dir / f"run-{n}-{label}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            result = timed_train(data, out, ["--set", "data.stream=true"])
            rows.append((n, f"streamed {label}", result))
            print(
                f"N={n:>7,} streamed {label:<6}: first step {result['first']:.1f} s, peak "
                f"RSS {result['peak_mb']:,.0f} MB, {result['speed']:.0f} img/s",
                flush=True,
            )
    n = args.images[0]
    folder = args.dir / str(n) / "folder"
    loader = statistics.median(loader_speed(folder, workers) for _ in range(args.repeats))
    bare = statistics.median(bare_speed(folder, workers) for _ in range(args.repeats))
    print(
        f"loader alone over {LOADER_IMAGES} images: aecli {loader:.0f} img/s, bare Pillow "
        f"loop {bare:.0f} img/s: {loader / bare:.2f}x"
    )
    shards = args.dir / str(n) / "shards"
    ours = statistics.median(shard_loader_speed(shards, workers) for _ in range(args.repeats))
    theirs = [webdataset_speed(shards, workers) for _ in range(args.repeats)]
    if theirs[0] is not None:
        theirs = statistics.median(theirs)
        print(
            f"shards, loader alone: aecli {ours:.0f} img/s, webdataset {theirs:.0f} img/s "
            f"(pip install webdataset): {ours / theirs:.2f}x"
        )
    # training: streamed against in memory on the same images (fixed centre crops in memory)
    preset = args.dir / "train-preset.yaml"
    preset.write_text(TRAIN_PRESET)
    random_crops = ["data.stream=true", "data.resize=[52,64]", "data.crop=random"]
    streamed, memory = [], []
    for repeat in range(args.repeats):
        for label, extra, into in (
            ("stream", random_crops, streamed),
            ("memory", ["data.stream=false"], memory),
        ):
            out = args.dir / f"run-train-{label}-{repeat}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            sets = [word for value in extra for word in ("--set", value)]
            into.append(timed_train(folder, out, sets, [str(preset), "--batch-size", "32"]))
    s = statistics.median(r["speed"] for r in streamed)
    m = statistics.median(r["speed"] for r in memory)
    peak_memory = statistics.median(r["peak_mb"] for r in memory)
    print(
        f"training {preset.name} on N={n:,}: streamed {s:.0f} img/s, in memory {m:.0f} img/s: "
        f"{s / m:.2f}x (in-memory peak RSS {peak_memory:,.0f} MB); medians of {args.repeats}"
    )


if __name__ == "__main__":
    main()

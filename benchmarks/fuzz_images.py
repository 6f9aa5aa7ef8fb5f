"""Feed aecli thousands of mutated image files and check that each one is processed or named.

Seeds: crops of scikit-learn's two sample photos and generated images (gradients, noise, flat
colours, alpha, 16-bit, palette), saved as PNG, JPEG, WebP, GIF, BMP and TIFF (several
compressions). Each mutant changes a seed file's bytes: flipped bits, random bytes, a cut,
a repeated or deleted stretch, or an enormous width and height written over the header.

`aecli reconstruct` runs over them in chunks (DataLoader workers, as users run it) with a time
limit per chunk. Reported: crashes (an exit status other than 0 or 1, or output that is not one
line per failed file plus the summary), hangs (a chunk over its time limit), and files neither
reconstructed nor named as failed.

    python benchmarks/fuzz_images.py                       # 10,000 files
    python benchmarks/fuzz_images.py --files 30000 --seed 3
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = [
    ("png", "PNG", {}),
    ("jpg", "JPEG", {"quality": 85}),
    ("jpg", "JPEG", {"quality": 70, "progressive": True}),
    ("webp", "WEBP", {"quality": 80}),
    ("webp", "WEBP", {"lossless": True}),
    ("gif", "GIF", {}),
    ("bmp", "BMP", {}),
    ("tif", "TIFF", {}),
    ("tif", "TIFF", {"compression": "tiff_lzw"}),
    ("tif", "TIFF", {"compression": "tiff_adobe_deflate"}),
    ("tif", "TIFF", {"compression": "packbits"}),
    ("tif", "TIFF", {"compression": "jpeg"}),
]


def seed_images(rng: np.random.Generator) -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    images = []
    for photo in load_sample_images().images:  # two 427x640 colour photos
        for _ in range(6):
            h, w = rng.integers(24, 160, 2)
            top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            images.append(Image.fromarray(photo[top : top + h, left : left + w]))
    y, x = np.mgrid[0:64, 0:96]
    images += [
        Image.fromarray(((x * 255 // 95)[..., None] * [1, 0, 1]).astype(np.uint8)),
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)),
        Image.new("RGB", (17, 33), (200, 30, 90)),
        Image.fromarray(rng.integers(0, 256, (32, 48, 4), np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (30, 20), np.uint8), "L"),
        Image.fromarray((x * 600).astype(np.uint16)).convert("I;16"),
        Image.fromarray(rng.integers(0, 256, (50, 30, 3), np.uint8)).convert("P"),
    ]
    return images


def encode(image: Image.Image, fmt: str, options: dict) -> bytes | None:
    """An image in a format, converted as that format needs; None where Pillow cannot."""
    if fmt in ("JPEG", "BMP") or options.get("compression") == "jpeg":
        image = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    elif fmt == "WEBP":
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
    except (OSError, ValueError, KeyError):
        return None
    return buffer.getvalue()


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # flipped bits
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # random bytes, often in the header
        for _ in range(rng.randint(1, 8)):
            span = min(len(data), 64) if rng.random() < 0.5 else len(data)
            i = rng.randrange(span)
            data[i] = rng.randrange(256)
    elif kind == 2:  # cut
        data = data[: rng.randrange(1, len(data))]
    elif kind == 3:  # a stretch repeated
        i = rng.randrange(len(data))
        j = min(len(data), i + rng.randint(1, 512))
        data[i:i] = data[i:j] * rng.randint(1, 4)
    elif kind == 4:  # a stretch deleted
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 256)]
    else:  # an enormous size written over 32-bit fields in the header
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(0, max(1, min(len(data), 40) - 4))
            data[i : i + 4] = rng.choice([b"\x00\x00\xff\xff", b"\xff\xff\x00\x00", b"\x7f\xff"
                                          b"\xff\xff", b"\x00\x01\x00\x00"])  # fmt: skip
    return bytes(data)


def make_files(folder: Path, count: int, seed: int) -> list[Path]:
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    seeds = [
        (suffix, data)
        for image in seed_images(nprng)
        for suffix, fmt, options in FORMATS
        if (data := encode(image, fmt, options)) is not None
    ]
    paths = []
    for i in range(count):
        suffix, data = rng.choice(seeds)
        path = folder / f"{i // 1000:02d}" / f"{i:05d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mutate(data, rng))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per 1,000 files")
    args = parser.parse_args()
    aecli = [sys.executable, "-m", "aecli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [*aecli, "train", "--out", str(tmp / "run"), "--epochs", "1", "--device", "cpu",
             "--set", "data.builtin_count=64"],
            check=True, capture_output=True,
        )  # fmt: skip
        weights = tmp / "run" / "model.safetensors"
        started = time.perf_counter()
        paths = make_files(tmp / "fuzz", args.files, args.seed)
        print(f"{len(paths):,} mutated files written in {time.perf_counter() - started:.1f} s")

        crashes = hangs = unaccounted = processed = 0
        reasons: Counter[str] = Counter()
        started = time.perf_counter()
        for chunk in sorted((tmp / "fuzz").iterdir()):
            out = tmp / "out" / chunk.name
            expected = {str(p) for p in chunk.iterdir()}
            try:
                ran = subprocess.run(
                    [*aecli, "reconstruct", str(weights), str(chunk), "-o", str(out), "--json",
                     "--device", "cpu"],
                    capture_output=True, text=True, timeout=args.timeout * len(expected) / 1000,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                hangs += 1
                print(f"hang: {chunk}")
                continue
            lines = ran.stderr.strip().splitlines()
            failed_lines = [line for line in lines if line.startswith("failed: ")]
            if ran.returncode not in (0, 1) or len(lines) != len(failed_lines) + 1:
                crashes += 1
                print(f"crash in {chunk}: exit {ran.returncode}; {lines[-3:]}")
                continue
            summary = json.loads(ran.stdout)
            done = {row["file"] for row in summary["rows"]}
            failed = {row["file"] for row in summary["failed"]}
            processed += len(done)
            unaccounted += len(expected - done - failed)
            reasons.update(row["reason"].split(" (")[0].split(":")[0] for row in summary["failed"])
        seconds = time.perf_counter() - started
        print(
            f"files: {len(paths):,}; reconstructed: {processed:,}; failed with a reason: "
            f"{sum(reasons.values()):,}; neither: {unaccounted}; crashes: {crashes}; "
            f"hangs: {hangs}; {seconds:.0f} s ({len(paths) / seconds:.0f} files/s)"
        )
        for reason, n in reasons.most_common(8):
            print(f"  {n:6,}  {reason}")


if __name__ == "__main__":
    main()

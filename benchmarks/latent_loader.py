"""Reading a latent folder for training: `LatentFolder.batches` against a bare numpy loop.

Writes a folder of --count random latents (4x32x32, float32 unless --dtype, in shards of
--shard-size) into a temporary folder, then reads it whole, in batches of --batch-size, in
folder order and shuffled:

- `latents/s`: LatentFolder.batches (open once, before the clock starts) against a bare loop
  over `np.memmap`s of the same shards doing the same work: the same batches in the same order
  (LatentFolder.batch_numbers), each shard's rows copied by one `np.take` into one contiguous
  array, wrapped as a torch tensor, with its labels and source names. The two alternate, and
  each figure is the median of --repeats epochs; the page cache holds the folder (just written).
- `peak RSS growth`: a fresh process reads every latent once (shuffled) and reports its peak
  resident memory above what it held before the first batch (/proc/self/status VmHWM, reset
  through /proc/self/clear_refs), for a folder of count/4 latents and one of count, through
  LatentFolder and through the bare loop (which keeps every page it read mapped).

    python benchmarks/latent_loader.py                   # 20,000 latents, and 5,000
    python benchmarks/latent_loader.py --count 100000 --dir /big/disk

Targets: LatentFolder at least 90% of the bare loop's latents/s, both orders; its peak RSS
growth the same at count/4 and count (flat in the folder's size).
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

from aecli.io.latent_folder import LatentFolder, write_latent_folder
from aecli.io.latents import SAFETENSORS_DTYPES, LatentFile
from aecli.io.shard_files import NUMPY_DTYPES

SHAPE = (4, 32, 32)
SEED = 0


def write_folder(folder: Path, count: int, shard_size: int, dtype: str) -> None:
    """`count` random latents of SHAPE with labels and source names, as a latent folder."""
    generator = torch.Generator().manual_seed(count)
    latents = LatentFile(
        torch.randn(count, *SHAPE, generator=generator),
        torch.arange(count) % 1000,
        "benchmark",
        [f"n{i % 1000:08d}/{i:08d}.JPEG" for i in range(count)],
        dtype=dtype,
    )
    settings = {"size": list(SHAPE[1:]), "store": "mean", "dtype": dtype}
    write_latent_folder(folder, latents, weights="benchmark", settings=settings,
                        shard_size=shard_size)  # fmt: skip


def bare_epoch(folder: Path, plan: list[np.ndarray]):
    """The same batches as LatentFolder.batches, by numpy and the index alone: yields
    (latents, labels, sources) per batch."""
    index = json.loads((folder / "index.json").read_text())
    shards = index["shards"]
    dtype = NUMPY_DTYPES[SAFETENSORS_DTYPES[index["settings"]["dtype"]]]
    maps = [
        np.memmap(folder / s["file"], dtype, "r", s["offset"], (s["count"], *s["shape"]))
        for s in shards
    ]
    starts = np.cumsum([0] + [s["count"] for s in shards])
    for numbers in plan:
        found = np.searchsorted(starts, numbers, side="right") - 1
        cuts = [0, *(np.flatnonzero(np.diff(found)) + 1).tolist(), len(numbers)]
        out = np.empty((len(numbers), *shards[int(found[0])]["shape"]), dtype)
        labels, sources = [], []
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            shard = shards[int(found[a])]
            rows = numbers[a:b] - starts[int(found[a])]
            np.take(maps[int(found[a])], rows, axis=0, out=out[a:b], mode="clip")
            picked = rows.tolist()
            labels += [shard["labels"][r] for r in picked]
            sources += [shard["sources"][r] for r in picked]
        latents = torch.from_numpy(out)
        if dtype == np.dtype("<i2"):
            latents = latents.view(torch.bfloat16)
        yield latents, labels, sources


def timed(epoch) -> tuple[float, int]:
    """Seconds to run through an epoch's batches, and the latents they held."""
    start, seen = time.perf_counter(), 0
    for batch in epoch:
        seen += len(batch["latents"] if isinstance(batch, dict) else batch[0])
    return time.perf_counter() - start, seen


def speeds(folder: Path, batch_size: int, shuffle: bool, repeats: int) -> tuple[float, float]:
    """Median latents/s of LatentFolder.batches and of the bare loop, alternating."""
    dataset = LatentFolder.open(folder)
    plan = dataset.batch_numbers(batch_size, shuffle, SEED)
    first = next(dataset.batches(batch_size, shuffle, SEED))
    assert torch.equal(first["latents"], next(bare_epoch(folder, plan))[0]), "not the same rows"
    ours, bare = [], []
    for repeat in range(repeats):
        runs = [
            (ours, lambda: dataset.batches(batch_size, shuffle, SEED)),
            (bare, lambda: bare_epoch(folder, plan)),
        ]
        for figures, epoch in runs if repeat % 2 else runs[::-1]:
            seconds, seen = timed(epoch())
            assert seen == dataset.count
            figures.append(seen / seconds)
    return statistics.median(ours), statistics.median(bare)


def child(folder: Path, reader: str, batch_size: int) -> None:
    """In a fresh process: read every latent once (shuffled); print the peak RSS growth."""
    dataset = LatentFolder.open(folder)
    if reader == "folder":
        epoch = dataset.batches(batch_size, True, SEED)
    else:
        epoch = bare_epoch(folder, dataset.batch_numbers(batch_size, True, SEED))
    with open("/proc/self/clear_refs", "w") as handle:  # VmHWM from here on
        handle.write("5")
    before = _status_kib("VmRSS")
    timed(epoch)
    print(json.dumps({"before": before, "peak": _status_kib("VmHWM")}))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key + ":"))


def peak_growth(folder: Path, reader: str, batch_size: int) -> tuple[float, float]:
    """(MiB resident before reading, MiB of peak growth while reading) in a fresh process."""
    command = [sys.executable, __file__, "--child", str(folder), "--reader", reader,
               "--batch-size", str(batch_size)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["before"] / 1024, (found["peak"] - found["before"]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--shard-size", type=int, default=2_500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=list(SAFETENSORS_DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the folders")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reader", default="folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.reader, args.batch_size)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        small, large = Path(root) / "small", Path(root) / "large"
        write_folder(large, args.count, args.shard_size, args.dtype)
        write_folder(small, max(1, args.count // 4), args.shard_size, args.dtype)
        started = time.perf_counter()
        dataset = LatentFolder.open(large)
        opened = time.perf_counter() - started
        mib = dataset.disk_bytes() / 2**20
        shape = "x".join(map(str, SHAPE))
        print(
            f"{args.count:,} latents of {shape} {args.dtype} in {len(dataset.shards)} shards "
            f"({mib:,.1f} MiB), batches of {args.batch_size}, median of {args.repeats} epochs "
            f"each (the page cache holding the folder); open: {opened * 1000:.1f} ms"
        )
        print()
        print("| order | LatentFolder latents/s | bare np.memmap latents/s | ratio |")
        print("|---|---:|---:|---:|")
        for shuffle in (False, True):
            ours, bare = speeds(large, args.batch_size, shuffle, args.repeats)
            name = "shuffled" if shuffle else "in order"
            print(f"| {name} | {ours:,.0f} | {bare:,.0f} | {ours / bare:.2f}x |")
        print()
        print("peak RSS growth reading every latent once, shuffled, in a fresh process:")
        print()
        print("| latents | folder | reader | RSS before | peak RSS growth |")
        print("|---:|---:|---|---:|---:|")
        for folder in (small, large):
            opened = LatentFolder.open(folder)
            size = opened.disk_bytes() / 2**20
            for reader, name in (("folder", "LatentFolder"), ("bare", "bare np.memmap")):
                before, growth = peak_growth(folder, reader, args.batch_size)
                print(
                    f"| {opened.count:,} | {size:,.1f} MiB | {name} | {before:,.1f} MiB | "
                    f"{growth:,.1f} MiB |"
                )


if __name__ == "__main__":
    main()

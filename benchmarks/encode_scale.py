"""`aecli encode` at data-set scale: peak memory, speed of the sharded path, time lost to a kill.

Encodes N photo-like JPEGs of mixed sizes (those of benchmarks/data_scale.py: 256 to 512 pixels
a side, written once under --dir) with a small fully convolutional VAE in the Stable Diffusion
layout (a random-init diffusers AutoencoderKL: 4 levels of 32/64/64/64 channels, 8x
downsampling, 4 latent channels), and reports for each N:

- `peak RSS`: the whole command's peak resident memory (/usr/bin/time -v, the largest of the
  main process and its loader workers) encoding into a latent folder with --buckets (the
  images' mixed aspect ratios give several shapes, so several shards per unit);
- `folder / file`: images/s of `-o DIR/` against the single-file path (`-o FILE.safetensors`,
  the only one before latent folders) on the same images at one --size, in the same run
  (the median of --repeats each);
- `kill`: a folder encode SIGKILLed at 60% of its time, then `--resume`d: the time the two
  together took beyond an uninterrupted run, against one shard's share of that run.

    python benchmarks/encode_scale.py                 # N = 2,000 and 20,000
    python benchmarks/encode_scale.py --images 2000 --repeats 1
    python benchmarks/encode_scale.py --device cuda --preset cat-kl-f8 --size 256x256 \
        --buckets 256 --images 10000 --repeats 1 --dir /dev/shm     # the GPU figure

Targets: peak memory at 20,000 within 10% of 2,000; the folder path at least 95% of the
single-file path's images/s; a kill loses at most one shard's work. Needs the test extra
(diffusers) to build the model.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import write_data  # noqa: E402

SHARD = 1000  # latents per shard
DEVICE, SIZE = "cpu", "64x64"  # set from the command line


def make_model(folder: Path) -> Path:
    """A random-init AutoencoderKL in the SD VAE layout, saved as diffusers saves real ones."""
    import diffusers
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64, 64, 64],
        layers_per_block=1,
        norm_num_groups=16,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=256,
    ).eval()
    vae.save_pretrained(folder)
    return folder


def preset_weights(preset: str, folder: Path) -> Path:
    """A preset's architecture at its initial weights, as a weights file."""
    from reconstruct_speed import write_weights

    path = folder / f"{preset}.safetensors"
    write_weights(preset, path)
    return path


def encode(model: Path, images: Path, out: Path, *extra: str) -> dict:
    """One `aecli encode` under /usr/bin/time -v: wall seconds, peak RSS, images."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "aecli", "encode", str(model),
               str(images), "-o", str(out), "--device", DEVICE, "--overwrite", *extra]  # fmt: skip
    started = time.perf_counter()
    ran = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if ran.returncode:
        raise SystemExit(f"aecli encode failed:\n{ran.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", ran.stderr).group(1))
    return {"seconds": seconds, "peak_mb": peak / 1024}


def killed_and_resumed(model: Path, images: Path, out: Path, after: float) -> tuple[float, float]:
    """Seconds of an encode into a folder SIGKILLed after `after` seconds, plus its --resume;
    and the seconds a --resume takes to start (on the finished folder: nothing to encode)."""
    command = [sys.executable, "-m", "aecli", "encode", str(model), str(images), "-o", str(out),
               "--device", DEVICE, "--overwrite", "--size", SIZE,
               "--shard-size", str(SHARD)]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after)
    process.send_signal(signal.SIGKILL)
    process.wait()
    command = [c for c in command if c != "--overwrite"] + ["--resume"]
    ran = subprocess.run(command, capture_output=True, text=True)
    if ran.returncode:
        raise SystemExit(f"aecli encode --resume failed:\n{ran.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    restart = time.perf_counter()  # the same --resume on the finished folder: start-up alone
    subprocess.run(command, capture_output=True, text=True, check=True)
    return seconds, time.perf_counter() - restart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    default = Path(tempfile.gettempdir()) / "aecli-data-scale"
    parser.add_argument("--dir", type=Path, default=default)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", help="a preset's architecture instead of the small SD VAE")
    parser.add_argument("--size", default="64x64", help="the single-file comparison's size")
    parser.add_argument("--buckets", default="64", help="--buckets of the mixed-size run")
    args = parser.parse_args()
    global DEVICE, SIZE
    DEVICE, SIZE, buckets = args.device, args.size, args.buckets
    work = args.dir / "encode"
    work.mkdir(parents=True, exist_ok=True)
    model = preset_weights(args.preset, work) if args.preset else make_model(work / "vae")
    print(f"model {args.preset or 'small SD-layout VAE'} on {DEVICE}, --size {SIZE}, "
          f"--buckets {buckets}, --shard-size {SHARD}", flush=True)  # fmt: skip
    rows = []
    for n in args.images:
        folder, _ = write_data(args.dir / str(n), n)
        mixed = encode(model, folder, work / f"mixed-{n}", "--buckets", buckets,
                       "--shard-size", str(SHARD))  # fmt: skip
        index = json.loads((work / f"mixed-{n}" / "index.json").read_text())
        speeds: dict[str, list[float]] = {"folder": [], "file": []}
        for _ in range(args.repeats):  # alternating, so that drift in the machine hits both
            for kind, out in (
                ("folder", work / f"one-{n}"),
                ("file", work / f"one-{n}.safetensors"),
            ):
                extra = ["--shard-size", str(SHARD)] if kind == "folder" else []
                speeds[kind].append(
                    n / encode(model, folder, out, "--size", SIZE, *extra)["seconds"]
                )
        folder_speed, file_speed = (statistics.median(speeds[k]) for k in ("folder", "file"))
        whole = n / folder_speed
        both, restart = killed_and_resumed(model, folder, work / f"killed-{n}", 0.6 * whole)
        lost = both - whole  # a second start-up, and the work of the unit the kill cut
        shard_time = whole * SHARD / n
        rows.append((n, mixed["peak_mb"], len(index["shards"]), len(index["shapes"]),
                     folder_speed, file_speed, lost, restart, shard_time))  # fmt: skip
        print(
            f"N={n:>6,}: peak RSS {mixed['peak_mb']:.0f} MB ({len(index['shards'])} shards, "
            f"{len(index['shapes'])} shapes); folder {folder_speed:.0f} img/s, file "
            f"{file_speed:.0f} img/s ({folder_speed / file_speed:.2f}x); kill lost {lost:.1f} s "
            f"(start-up {restart:.1f} s, work {lost - restart:.1f} s), one shard's work "
            f"{shard_time:.1f} s",
            flush=True,
        )
    print("\n| images | peak RSS | shards (shapes) | folder img/s | file img/s | ratio | kill lost "
          "(start-up + work) | one shard's work |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, peak, shards, shapes, fs, ss, lost, restart, shard_time in rows:
        print(f"| {n:,} | {peak:.0f} MB | {shards} ({shapes}) | {fs:.0f} | {ss:.0f} | "
              f"{fs / ss:.2f}x | {lost:.1f} s ({restart:.1f} + {lost - restart:.1f}) | "
              f"{shard_time:.1f} s |")  # fmt: skip
    if len(rows) > 1:
        print(f"\npeak RSS at {rows[-1][0]:,} / at {rows[0][0]:,}: {rows[-1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()

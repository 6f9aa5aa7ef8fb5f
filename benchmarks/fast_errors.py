"""How long aecli takes to refuse what it can check without torch: a wrong path, preset, key
or device (the target: under a second), against `aecli presets` and a bare `import torch`.

Each command runs as a new process (as a user types it), `--repeats` times; the median wall
time is printed.

    python benchmarks/fast_errors.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [
    ("missing preset file, with --device cuda", ["train", "missing.yaml", "--device", "cuda"]),
    ("misspelt preset key", ["train", "--set", "model.latent.dimm=3"]),
    ("missing --data folder", ["train", "--data", "no-such-folder/"]),
    ("missing weights file", ["reconstruct", "no-such.safetensors", "a.png", "-o", "out/"]),
    ("unknown device", ["encode", "w.safetensors", "a.png", "-o", "z.npy", "--device", "gpu"]),
    ("missing folder given to info", ["info", "sd-vae-ft-mse/"]),
    ("for comparison: aecli presets", ["presets"]),
]


def timed(command: list[str], folder: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=folder, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [(label, [sys.executable, "-m", "aecli", *argv]) for label, argv in CASES]
        rows.append(("for comparison: python -c 'import torch'",
                     [sys.executable, "-c", "import torch"]))  # fmt: skip
        print(f"{'case':<44} median of {args.repeats}")
        for label, command in rows:
            seconds = [timed(command, folder) for _ in range(args.repeats)]
            print(f"{label:<44} {statistics.median(seconds):.2f} s", flush=True)


if __name__ == "__main__":
    main()

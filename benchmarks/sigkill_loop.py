"""Kill training with SIGKILL at random moments, resume it each time, and check what it left.

One run of the `default` preset (cifar-res) on the built-in shapes, a checkpoint every step,
is killed `--kills` times at a random moment (uniform over `--window` seconds after its process
starts: during start-up, training, checkpoint and weights writes, validation) and resumed after each
kill with `aecli train --resume`, until it finishes. After every kill it checks that
model.safetensors and checkpoint.safetensors are readable (or not there yet), that the resume
starts, that state.json and report.html are whole, and counts leftover temporary files. At the
end the weights are compared, tensor for tensor, with the same run never interrupted (bit-exact
on the CPU), and so are metrics.jsonl's records (every epoch and logging window once, with the
same losses) and the state `aecli runs` reports (finished).

    python benchmarks/sigkill_loop.py                  # 100 kills
    python benchmarks/sigkill_loop.py --kills 300 --seed 2
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from aecli.errors import AecliError
from aecli.io.checkpoint import load_checkpoint
from aecli.io.weights import load_weights
from aecli.run.files import RunDirectory
from aecli.run.status import summarize_run


def losses(run: Path) -> list[tuple]:
    """(kind, step, loss) of every metrics.jsonl record: what a resumed run must repeat."""
    return [(r.get("kind"), r["step"], r["loss"]) for r in RunDirectory(run).records()]


SETTINGS = [
    "--set", "data.builtin_count=512",
    "--set", "train.batch_size=32",
    "--set", "train.checkpoint_every=1",
    "--set", "train.log_every=1",
    "--epochs", "160",
]  # fmt: skip


def aecli(*args: str) -> list[str]:
    return [sys.executable, "-m", "aecli", *args]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--window", type=float, default=6.0, help="seconds after each start")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run, reference = tmp / "run", tmp / "reference"
        started = time.perf_counter()
        subprocess.run(
            aecli("train", "--out", str(reference), "--device", "cpu", *SETTINGS),
            check=True, capture_output=True,
        )  # fmt: skip
        print(f"uninterrupted run: {time.perf_counter() - started:.1f} s")

        kills = unreadable = failed_resumes = leftovers = before_first_save = 0
        finished = False
        command = aecli("train", "--out", str(run), "--device", "cpu", *SETTINGS)
        started = time.perf_counter()
        while not finished:
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            try:
                process.wait(timeout=rng.uniform(0.0, args.window) if kills < args.kills else None)
                _, stderr = process.communicate()
                if process.returncode != 0:
                    failed_resumes += 1
                    print(f"exit {process.returncode}: {stderr.strip().splitlines()[-1:]}")
                    break
                finished = True
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                kills += 1
            for name, check in (
                ("model.safetensors", load_weights),
                ("checkpoint.safetensors", load_checkpoint),
            ):
                if (run / name).exists():
                    try:
                        check(run / name)
                    except AecliError as exc:
                        unreadable += 1
                        print(f"kill {kills}: unreadable {name}: {exc}")
            if (run / "state.json").exists() and RunDirectory(run).read_state().state is None:
                unreadable += 1
                print(f"kill {kills}: unreadable state.json")
            if (run / "report.html").exists() and not (
                (run / "report.html").read_text().rstrip().endswith("</html>")
            ):
                unreadable += 1
                print(f"kill {kills}: report.html cut short")
            has_checkpoint = (run / "checkpoint.safetensors").exists()
            if has_checkpoint and load_checkpoint(run / "checkpoint.safetensors")[
                "train_state"
            ].get("finished"):
                finished = True  # killed after it had written everything: the run is complete
            before_first_save += not has_checkpoint
            if has_checkpoint:
                command = aecli("train", "--resume", str(run), "--device", "cpu")
            else:  # killed before its first save: the same command reuses the folder
                command = aecli("train", "--out", str(run), "--device", "cpu", *SETTINGS)
            if finished:
                leftovers = len(list(run.rglob(".*.tmp")))
        seconds = time.perf_counter() - started
        a, b = tensors(reference / "model.safetensors"), tensors(run / "model.safetensors")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        same_records = losses(reference) == losses(run)
        state = summarize_run(run).state
        print(
            f"kills: {kills} ({before_first_save} before the first checkpoint); "
            f"unreadable files: {unreadable}; failed resumes: {failed_resumes}; "
            f"temporary files left at the end: {leftovers}; "
            f"final weights equal to the uninterrupted run: {'yes' if same else 'NO'}; "
            f"metrics.jsonl records equal: {'yes' if same_records else 'NO'}; state: {state}; "
            f"{seconds:.0f} s"
        )


if __name__ == "__main__":
    main()

"""Attack the folders aecli reads and writes at data-set scale, and check aecli.

Two surfaces, each from a real template made first with the tests' tiny preset:

- latent folders: a finished `aecli encode W images/ -o lat/ --shard-size 4` (6 units), and an
  interrupted one (the same encode stopped by Ctrl-C after its second unit). Each case copies
  one and does one or two damages: a user's own `index.json` or `encode.json` (JSON that is not
  aecli's record), a FIFO, a folder or a symbolic link to a user's file under one of the
  folder's names, a shard cut short or with bytes overwritten, a shard header that claims
  terabytes, a sparse index.json of NUL bytes, a user's `notes.txt`, or the folder's lock held
  by a live process. Then `info`, `decode` (into a fresh folder), `encode --resume` with the
  same inputs, `encode --resume` with changed inputs (another folder with other pictures under
  the same names, one picture changed, one added), and `encode --overwrite` into it.
- shard folders: four WebDataset tar shards of 8 JPEGs. Each case copies them and does one or
  two damages: a FIFO named `zz.tar`, a member whose header claims 2 GiB over a sparse file, a
  shard cut short, bytes that are not a tar under a `.tar` name, a member named with control
  characters and markup, a symbolic link to a user's file named like a shard, or every shard
  removed. Then `aecli train` (streamed, --epochs 1); and, for a third of the cases, a kill-free
  interruption (--epochs 1, then a shard removed) followed by `train --resume --epochs 2`.

Every command runs in this process under a watchdog (`--hang` seconds, SIGALRM: a FIFO opened
for reading never hangs the fuzz, it is a defect) with data-loader workers off (`data.workers=0`,
so that a hang is in this process). Reported, each one a defect: a hang, an internal error or
Python exception, a refusal of more than one line, a user's file (outside or inside the folder)
changed or removed, an input changed, a resume with changed inputs that ran, a resume on a
shard folder that lost a shard that ran without a word, and a case whose peak resident memory
rose more than 512 MB above the baseline (Linux's VmHWM, reset before each case).

    python benchmarks/fuzz_folders.py                  # 300 cases
    python benchmarks/fuzz_folders.py --cases 60 --seed 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

from typer.testing import CliRunner

from aecli.cli import app
from aecli.io.latent_folder import FolderWriter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import TINY, write_image  # noqa: E402  (the tests' tiny preset and images)
from fuzz_headers import rss_peak_mb, rss_peak_reset  # noqa: E402
from fuzz_runs import BOUND_MB, digest, finish, outcome  # noqa: E402
from test_stream import add_member, jpeg, photo, write_shards  # noqa: E402

USER_NOTE = b"a user's notes, never to be touched\n"
# a user's JSON under aecli's names (one that starts as aecli's own record does, with its format
# tag, is aecli's: a damaged index of its own, which --overwrite may replace)
FOREIGN_JSON = [b'{"name": "my app"}', b"[1, 2, 3]", b'{"format": "my-latent-folder"}', b"{"]
LOCK_HELPER = """\
import sys
from pathlib import Path
from aecli.io.latent_folder import LOCK
from aecli.io.locks import FolderLock
lock = FolderLock(Path(sys.argv[1]), LOCK, "held")
print("ok", flush=True)
sys.stdin.read()
"""


class Hang(Exception):
    """A command ran past the watchdog."""


def _alarm(signum, frame):
    raise Hang()


def regular(path: Path) -> bool:
    """A regular file, not a link (damages write only into those: never through a link to a
    user's file, never into a FIFO)."""
    return path.is_file() and not path.is_symlink()


def clear(path: Path) -> None:
    """Remove whatever is at `path` (a link itself, not what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def damage_latents(folder: Path, rng: random.Random, user_file: Path, owned: set[str]) -> str:
    """One damage to a latent folder; what was done, in a few words. The names of files it
    wrote as a user's own go into `owned`."""
    kind = rng.choice(["foreign", "special", "cut", "bytes", "huge", "sparse", "notes"])
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    target = folder / rng.choice([*names, "index.json", "encode.json"])
    if kind == "foreign":
        name = rng.choice(["index.json", "encode.json"])
        clear(folder / name)
        (folder / name).write_bytes(rng.choice(FOREIGN_JSON))
        owned.add(name)
        return f"foreign {name}"
    if kind == "notes":
        (folder / "notes.txt").write_bytes(USER_NOTE)
        owned.add("notes.txt")
        return "notes.txt"
    if kind == "special":
        clear(target)
        choice = rng.randrange(3)
        if choice == 0:
            os.mkfifo(target)
        elif choice == 1:
            target.mkdir()
        else:
            target.symlink_to(user_file)
        return f"{['fifo', 'folder', 'link'][choice]} {target.name}"
    shards = [p for p in sorted(folder.glob("latents-*.safetensors")) if regular(p)]
    if not shards:
        return "none"
    shard = rng.choice(shards)
    data = bytearray(shard.read_bytes())
    if kind == "cut":
        shard.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "bytes":
        for _ in range(rng.choice([1, 8, 64])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        shard.write_bytes(bytes(data))
    elif kind == "huge":  # a tensor's end offset claims a terabyte
        length = int.from_bytes(data[:8], "little")
        try:
            header = json.loads(data[8 : 8 + length])
            name = next(k for k in header if k != "__metadata__")
            header[name]["data_offsets"][1] = 1 << 40
        except (ValueError, StopIteration, TypeError, KeyError, IndexError):
            return "none (cut before)"
        text = json.dumps(header).encode()
        shard.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data[8 + length :]))
    else:  # index.json, or a shard, as a sparse file of NUL bytes
        sparse = rng.choice([folder / "index.json", shard])
        clear(sparse)
        with sparse.open("wb") as handle:
            handle.truncate(1 << 30)
        return f"sparse {sparse.name}"
    return f"{kind} {shard.name}"


def damage_shards(folder: Path, rng: random.Random, user_file: Path, owned: set[str]) -> str:
    """One damage to a folder of WebDataset shards; what was done, in a few words."""
    kind = rng.choice(["fifo", "huge", "cut", "not-tar", "names", "link", "empty"])
    shards = [p for p in sorted(folder.glob("*.tar")) if regular(p)]
    if kind == "fifo" and not (folder / "zz.tar").exists():
        os.mkfifo(folder / "zz.tar")
    elif kind == "huge":  # a member whose header claims 2 GiB: a sparse file, no disk used
        path = folder / "zz-huge.tar"
        with tarfile.open(path, "w") as tar:
            add_member(tar, "100000.jpg", jpeg(photo(1000)))
        with path.open("r+b") as handle:
            handle.seek(0, os.SEEK_END)
            offset = handle.tell() - 1024  # the end-of-archive blocks
            info = tarfile.TarInfo("100001.jpg")
            info.size = 2 << 30
            handle.seek(offset)
            handle.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            handle.truncate(offset + 512 + (2 << 30) + 1024)
    elif kind == "cut" and shards:
        shard = rng.choice(shards)
        data = shard.read_bytes()
        shard.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "not-tar":
        (folder / "zz-bytes.tar").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    elif kind == "names":
        with tarfile.open(folder / "zz-names.tar", "w") as tar:
            add_member(tar, "[red]x\x1b[2J\n.jpg", jpeg(photo(7)))
            add_member(tar, "../../escape.jpg", jpeg(photo(8)))
    elif kind == "link" and not (folder / "zz-link.tar").is_symlink():
        (folder / "zz-link.tar").symlink_to(user_file)
    elif kind == "empty":
        for shard in shards:
            shard.unlink()
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hang", type=int, default=60, help="seconds before a command hangs")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    runner = CliRunner()
    signal.signal(signal.SIGALRM, _alarm)
    cpu = ["--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as children:
        tmp = Path(tmp)
        (tmp / "tiny.yaml").write_text(TINY)
        user_file = tmp / "user-notes.txt"
        user_file.write_bytes(USER_NOTE)

        def invoke(command: list[str]):
            signal.alarm(args.hang)
            try:
                return runner.invoke(app, [str(c) for c in command], catch_exceptions=True)
            finally:
                signal.alarm(0)

        made = invoke(["train", tmp / "tiny.yaml", "--out", tmp / "model", "--epochs", "1", *cpu])
        assert made.exit_code == 0, made.output
        weights = tmp / "model" / "model.safetensors"
        images, other, grown = tmp / "images", tmp / "other", tmp / "grown"
        for i in range(24):
            write_image(images / f"{i:03d}.png", seed=i)
            write_image(other / f"{i:03d}.png", seed=1000 + i)
        shutil.copytree(images, grown)
        write_image(grown / "999.png", seed=999)
        templates = tmp / "templates"
        encode = ["encode", weights, images, "--shard-size", "4", "--workers", "0", *cpu]
        assert invoke([*encode, "-o", templates / "finished"]).exit_code == 0
        write_unit, calls = FolderWriter.write_unit, []

        def interrupt_after_two(self, *a, **k):
            calls.append(1)
            if len(calls) > 2:
                raise KeyboardInterrupt
            return write_unit(self, *a, **k)

        with mock.patch.object(FolderWriter, "write_unit", interrupt_after_two):
            stopped = invoke([*encode, "-o", templates / "interrupted"])
        assert stopped.exit_code != 0 and (templates / "interrupted" / "encode.json").is_file()
        write_shards(templates / "shards", 4, 8)
        inputs = {p: digest(p) for p in (images, other, grown, weights.parent)}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        defects: list[str] = []
        outcomes: Counter[str] = Counter()
        damages: Counter[str] = Counter()
        peaks: list[float] = []
        started = time.perf_counter()
        for number in range(args.cases):
            surface = rng.choice(["finished", "interrupted", "shards"])
            case = tmp / f"case-{number:04d}"
            shutil.copytree(templates / surface if surface != "shards" else templates / "shards",
                            case, symlinks=True)  # fmt: skip
            damage = damage_latents if surface != "shards" else damage_shards
            owned: set[str] = set()
            done = [damage(case, rng, user_file, owned) for _ in range(rng.choice([1, 1, 2]))]
            damages.update(d.split(" ")[0] for d in done)
            locker = None
            if surface != "shards" and rng.random() < 0.1 and (case / "encode.json").is_file():
                pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
                command = [sys.executable, "-c", LOCK_HELPER, str(case)]
                locker = subprocess.Popen(command, env=env, **pipes)
                children.callback(locker.kill)
                assert locker.stdout.readline().strip() == "ok"
                done.append("locked by a live process")
            label = f"case {number} ({surface}; {', '.join(done)})"
            users = {k: v for k, v in digest(case).items() if k in owned}
            out = tmp / f"out-{number:04d}"
            if surface == "shards":
                run = tmp / f"run-{number:04d}"
                train = ["train", tmp / "tiny.yaml", "--data", case, "--set", "data.workers=0",
                         *cpu]  # fmt: skip
                commands = [("train", [*train, "--out", run, "--epochs", "1"], None)]
                if rng.random() < 1 / 3:
                    commands.append(("remove a shard", None, None))
                    commands.append(("train --resume", ["train", "--resume", run, "--epochs", "2",
                                                        *cpu], "lost"))  # fmt: skip
            else:
                encode_to = ["encode", weights, "-o", case, "--shard-size", "4", "--workers", "0"]
                commands = [
                    ("info", ["info", case], None),
                    ("decode", ["decode", weights, case, "-o", out, *cpu], None),
                    ("encode --resume", [*encode_to[:2], images, *encode_to[2:], "--resume", *cpu],
                     None),
                    ("encode --resume other", [*encode_to[:2], other, *encode_to[2:], "--resume",
                                               *cpu], "changed"),
                    ("encode --resume grown", [*encode_to[:2], grown, *encode_to[2:], "--resume",
                                               *cpu], "changed"),
                    ("encode --overwrite", [*encode_to[:2], images, *encode_to[2:], "--overwrite",
                                            *cpu], None),
                ]  # fmt: skip
            for name, command, expect in commands:
                if command is None:  # between the run and its resume: a shard goes
                    shards = sorted(case.glob("*.tar"))
                    if shards:
                        shards[0].unlink()
                    continue
                rss_peak_reset()
                baseline = rss_peak_mb()
                try:
                    result = invoke(command)
                except Hang:
                    defects.append(f"{label} {name}: hangs (over {args.hang} s)")
                    outcomes[f"{name}: hangs"] += 1
                    continue
                peak = rss_peak_mb() - baseline
                peaks.append(peak)
                outcomes[f"{name}: {'ran' if result.exit_code == 0 else 'refused'}"] += 1
                problem = outcome(result)
                if problem is not None:
                    defects.append(f"{label} {name}: {problem}")
                if peak > BOUND_MB:
                    defects.append(f"{label} {name}: {peak:.0f} MB above the baseline")
                if expect == "changed" and result.exit_code == 0 and "locked" not in label:
                    defects.append(f"{label} {name}: resumed with other inputs")
                if expect == "lost" and result.exit_code == 0 and "warning" not in result.output:
                    defects.append(f"{label} {name}: resumed on fewer shards without a word")
            now = digest(case)
            for key, value in users.items():
                if now.get(key) != value:
                    defects.append(f"{label}: the user's {key} changed or removed")
            if user_file.read_bytes() != USER_NOTE:
                defects.append(f"{label}: the user's file outside the folder changed")
                user_file.write_bytes(USER_NOTE)
            for path, before in inputs.items():
                if digest(path) != before:
                    defects.append(f"{label}: an input under {path.name} changed")
                    inputs[path] = digest(path)
            if locker is not None:
                locker.kill()
                locker.wait()
            for path in (case, out, tmp / f"run-{number:04d}"):
                shutil.rmtree(path, ignore_errors=True)
            if (number + 1) % 50 == 0:
                print(f"{number + 1:,} cases, {time.perf_counter() - started:.0f} s, "
                      f"{len(defects)} defects", flush=True)  # fmt: skip
        seconds = time.perf_counter() - started
        print(f"\n{args.cases:,} cases in {seconds:.0f} s (seed {args.seed})")
        print(f"damages: {dict(damages)}")
        print(f"commands: {dict(sorted(outcomes.items()))}")
        finish(peaks, defects)


if __name__ == "__main__":
    main()

"""Damage training runs' files a thousand ways, with other processes at work, and check aecli.

Three runs of the tests' tiny preset are made first: a finished one, an interrupted one (a real
`aecli train` SIGKILLed after its second epoch's checkpoint) and a live one (a real `aecli train`
that stays alive for the whole fuzz, training while the cases on it run and stopped with SIGSTOP
during the others, so that it does not take a core from them). Each case copies the finished or the
interrupted run, or makes a "running" one (the interrupted run with `state.json` saying running and
the run lock held by a helper process through the lock `aecli train` takes), and does one to three
damages to it: a file cut short, bytes overwritten (also with non-UTF-8 ones), lines appended to
metrics.jsonl that are not records (`null`, `[1,2]`, strings for numbers, bad bytes, deep nesting),
state.json that is not an object of the right types, stray files (grids named `epoch-final.png`, a
folder named like a grid or like metrics.jsonl, a user's `.notes.tmp`, the run lock replaced by a
symbolic link to a user's file, a folder or a FIFO), a FIFO in place of state.json, metrics.jsonl or
config.yaml, a metrics.jsonl of 3 GiB (sparse: NUL bytes, or one line that never ends), a file
removed, or config.yaml edited to another valid architecture. A share of the cases on unlocked runs
has the helper hold the lock too (a second `aecli train` that started first). The lock file of a run
a process holds is never damaged: replacing it hides that process from everyone (aecli then goes by
the process id in state.json).

Then, in this process, on each case: `aecli runs` (table and --json) of the folder holding the case,
the live run and an untouched run; `aecli report` (in place and with -o); a concurrent `aecli train
--out` into the case; and `aecli train --resume`. Every 25th case whose run is not locked also
starts two real `aecli train --resume` processes on it at the same moment.

Reported, each one a defect: a command still running after two minutes (a SIGALRM watchdog: a FIFO
read without O_NONBLOCK), a case whose peak resident memory rose more than 512 MB above the baseline
(Linux's VmHWM, reset before each command), an internal error or Python exception, a refusal of more
than one line, a damaged run missing from `runs --json`, any file changed in a run that another
process holds (or in a run the command was not about), a user's file changed or removed, a live run
not listed as running, and two simultaneous resumes that both trained or left an epoch twice in
metrics.jsonl. At the end the live run is stopped and its metrics.jsonl must hold every epoch once,
in order.

    python benchmarks/fuzz_runs.py                  # 1,000 cases
    python benchmarks/fuzz_runs.py --cases 200 --seed 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from aecli.cli import app
from aecli.errors import AecliError
from aecli.run.files import RunDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY  # noqa: E402  (the tests' tiny preset: trains in seconds)
from fuzz_headers import rss_peak_mb, rss_peak_reset  # noqa: E402

RUN_FILES = [
    "config.yaml",
    "metrics.jsonl",
    "state.json",
    "checkpoint.safetensors",
    "model.safetensors",
    "report.html",
    "grids/epoch-0001.png",
]
USER_NOTE = b"a user's notes, never to be touched\n"
HANG_SECONDS = 120  # a command still running then is a hang (a FIFO opened for reading, say)
BOUND_MB = 512  # a case may take at most this much memory above the baseline
HELPER = """\
import sys
from pathlib import Path
from aecli.run.files import run_lock
held = {}
for line in sys.stdin:
    command, path = line.rstrip("\\n").split(" ", 1)
    if command == "lock":
        held[path] = run_lock(Path(path), "--out")
    else:
        held.pop(path).release()
    print("ok", flush=True)
"""
NOT_RECORDS = [
    b"\xff\xfe\xfd",
    b"null",
    b"[1, 2]",
    b'"epoch"',
    b'{"epoch": "1", "step": 3, "loss": 0.1}',
    b'{"kind": "epoch", "epoch": 1, "step": 3, "loss": "x"}',
    b'{"kind": "window", "epoch": -1, "step": 2}',
    b'{"kind": "epoch", "epoch": 1e400, "step": 1}',
    b'{"epoch": 2, "step": 4, "val_psnr": NaN, "val_loss": Infinity}',
    b"[" * 100_000,
    b'{"kind": "epoch", "epoch": 1, "step": 3, "loss": ' + b"9" * 5000 + b"}",
    b"x" * 1_000_000,
    b'{"kind": "\x1b[2J[red]", "epoch": 1, "step": 1}',
]
BAD_STATES = [
    b"null",
    b"[1]",
    b'"running"',
    b"{}",
    b'{"state": 5}',
    b'{"state": "running", "pid": "x", "host": 7}',
    b'{"state": "running", "pid": 1}',
    b'{"state": "finished", "epochs": "many", "started": "yesterday"}',
    b'{"state": "failed", "reason": {"a": 1}}',
    b'{"state": "\x1b]0;owned\x07[bold]x", "preset": "[/b]", "data": {"kind": 3}}',
    b'{"state": "interrupted", "data": {"kind": "folder", "path": ["x"]}}',
    b"[" * 100_000,
    b"\xff" * 20,
]


class Hang(Exception):
    """A command ran past HANG_SECONDS."""


def _alarm(signum, frame):
    raise Hang()


def digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under `root` (but `skip`) by its sha256 (by size and modification time past
    64 MiB: the sparse files of the damages); links and other entries by kind."""
    found = {}
    for folder, dirs, files in os.walk(root):
        if skip is not None and Path(folder) == skip:
            dirs.clear()
            continue
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_file() and path.stat().st_size > 64 << 20:
                info = path.stat()
                found[key] = f"size {info.st_size}, modified {info.st_mtime_ns}"
            elif path.is_file():
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif not path.is_dir():
                found[key] = "special"
    return found


def unlink_special(path: Path) -> None:
    """Remove a FIFO (or another special file) an earlier damage put at `path`: the damage
    after it writes a file there, and writing into a FIFO would wait for a reader."""
    if path.exists() and not path.is_file() and not path.is_dir():
        path.unlink()


def damage(run: Path, rng: random.Random, user_file: Path, locked: bool) -> str:
    """Do one damage to the run in `run`; what was done, in a few words. The lock file of a
    run a process holds is left alone: replacing it hides that process from everyone."""
    kinds = ["cut", "bytes", "lines", "state", "stray", "lock", "missing", "architecture",
             "fifo", "huge"]  # fmt: skip
    kind = rng.choice(kinds[:5] + kinds[6:] if locked else kinds)
    target = run / rng.choice(RUN_FILES)
    if kind in ("cut", "bytes") and not target.is_file():
        kind = "missing"
    if kind == "cut":
        data = target.read_bytes()
        target.write_bytes(data[: rng.randrange(len(data) + 1)])
    elif kind == "bytes":
        data = bytearray(target.read_bytes())
        for _ in range(rng.choice([1, 4, 64])):
            if data:
                data[rng.randrange(len(data))] = rng.choice([0x00, 0xFF, 0x80, rng.randrange(256)])
        target.write_bytes(bytes(data))
    elif kind == "lines" and (run / "metrics.jsonl").is_file():
        with (run / "metrics.jsonl").open("ab") as handle:
            handle.write(rng.choice(NOT_RECORDS) + b"\n")
    elif kind == "lines":
        kind = "none (metrics.jsonl is not a file)"
    elif kind == "state":
        unlink_special(run / "state.json")
        (run / "state.json").write_bytes(rng.choice(BAD_STATES))
    elif kind == "stray":
        grids = run / "grids"
        choice = rng.randrange(6)
        if choice == 0 and grids.is_dir():
            source = next(grids.glob("*.png"), None)
            (grids / "epoch-final.png").write_bytes(source.read_bytes() if source else b"x")
        elif choice == 1 and grids.is_dir():
            (grids / "epoch-0099.png").mkdir(exist_ok=True)
        elif choice == 2:
            (run / ".notes.tmp").write_bytes(USER_NOTE)
        elif choice == 3:
            (run / "[red]notes\x1b[2J.txt").write_bytes(USER_NOTE)
        elif choice == 4 and grids.is_dir():
            shutil.rmtree(grids)
            grids.write_bytes(USER_NOTE)  # a file where the grids' folder goes
        else:
            metrics = run / "metrics.jsonl"
            if metrics.is_file():
                metrics.unlink()
                metrics.mkdir()
        kind = f"stray {choice}"
    elif kind == "lock":
        lock = run / ".aecli-run.lock"
        if lock.is_dir() and not lock.is_symlink():
            lock.rmdir()
        else:
            lock.unlink(missing_ok=True)
        choice = rng.randrange(3)
        if choice == 0:
            lock.symlink_to(user_file)
        elif choice == 1:
            lock.mkdir()
        else:
            os.mkfifo(lock)
        kind = f"lock {choice}"
    elif kind == "missing":
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.parent.is_dir():
            target.unlink(missing_ok=True)
    elif kind == "fifo":  # where aecli reads a record: reading it must not wait for a writer
        target = run / rng.choice(["state.json", "metrics.jsonl", "config.yaml"])
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
        os.mkfifo(target)
    elif kind == "huge":  # a sparse metrics.jsonl of 3 GiB: NUL bytes, or one endless line
        target = run / "metrics.jsonl"
        unlink_special(target)
        with contextlib.suppress(OSError), target.open("ab") as handle:
            if rng.random() < 0.5:
                handle.write(b'{"kind": "epoch", "epoch": 1, "step": 3, "loss": ' + b"1" * 4096)
            handle.truncate(3 << 30)
    else:  # config.yaml edited to another valid architecture
        config = run / "config.yaml"
        if config.is_file():
            config.write_bytes(config.read_bytes().replace(b"out: 8,", b"out: 16,", 1))
    named = ("cut", "bytes", "missing", "fifo", "huge")
    return f"{kind} {target.name}" if kind in named else kind


def outcome(result) -> str | None:
    """None where the command ran or refused in one line; else the defect, in one line."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        if isinstance(result.exception, AecliError):
            return None
        text = "".join(traceback.format_exception(result.exception))
        return text.strip().splitlines()[-1][:200]
    errors = [line for line in (result.stderr or "").splitlines() if line.startswith("error")]
    if any("internal error" in line for line in errors):
        return errors[-1][:200]
    if result.exit_code != 0 and len(errors) != 1:
        tail = (result.stderr or "").strip().splitlines()[-1:] or [""]
        return f"exit {result.exit_code} with {len(errors)} error lines: {tail[0][:160]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    runner = CliRunner()
    signal.signal(signal.SIGALRM, _alarm)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as children:
        tmp = Path(tmp)
        preset = tmp / "tiny.yaml"
        preset.write_text(TINY)
        user_file = tmp / "user-notes.txt"
        user_file.write_bytes(USER_NOTE)
        templates, root = tmp / "templates", tmp / "runs"
        root.mkdir()
        common = ["--device", "cpu"]
        result = runner.invoke(app, ["train", str(preset), "--out", str(templates / "finished"),
                                     "--epochs", "2", *common])  # fmt: skip
        assert result.exit_code == 0, result.output
        shutil.copytree(templates / "finished", root / "untouched")

        def train_process(out: Path) -> subprocess.Popen:
            command = [sys.executable, "-m", "aecli", "train", str(preset), "--out", str(out),
                       "--epochs", "100000", *common]  # fmt: skip
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            process = subprocess.Popen(command, env=env, start_new_session=True, **quiet)
            children.callback(process.kill)  # also when the fuzz itself fails
            return process

        def epochs(run: Path) -> int:
            data = (run / "metrics.jsonl").read_bytes() if (run / "metrics.jsonl").exists() else b""
            return data.count(b'"kind": "epoch"')

        killed = train_process(templates / "interrupted")
        while epochs(templates / "interrupted") < 2:
            time.sleep(0.05)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        live = train_process(root / "live")
        while epochs(root / "live") < 1:
            time.sleep(0.05)
        helper = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        children.callback(helper.kill)

        def ask_helper(command: str, path: Path) -> None:
            helper.stdin.write(f"{command} {path}\n")
            helper.stdin.flush()
            assert helper.stdout.readline().strip() == "ok", f"the helper could not {command}"

        outcomes: Counter[str] = Counter()
        defects: list[str] = []
        peaks: list[float] = []
        damages: Counter[str] = Counter()
        concurrent: Counter[str] = Counter()
        started = time.perf_counter()
        for number in range(args.cases):
            base = rng.choice(["finished", "interrupted", "running", "live"])
            case = root / "live" if base == "live" else root / f"case-{number:04d}"
            locked = base in ("running", "live")
            done = []
            if base != "live":
                shutil.copytree(templates / ("finished" if base == "finished" else "interrupted"),
                                case, symlinks=True)  # fmt: skip
                locked = locked or rng.random() < 0.2
                if locked:
                    ask_helper("lock", case)
                if base == "running":
                    state = json.loads((case / "state.json").read_text())
                    state.update(state="running", pid=helper.pid, host=socket.gethostname())
                    (case / "state.json").write_text(json.dumps(state))
                for _ in range(rng.choice([1, 1, 2, 3])):
                    done.append(damage(case, rng, user_file, locked))
                damages.update(d.split(" ")[0] for d in done)
            live.send_signal(signal.SIGCONT if base == "live" else signal.SIGSTOP)
            label = f"case {number} ({base}{', locked' if locked else ''}; {', '.join(done)})"
            commands = [
                ("runs", ["runs", str(root)]),
                ("runs --json", ["runs", str(root), "--json"]),
                ("report -o", ["report", str(case), "-o", str(tmp / "r.html"), "--overwrite"]),
                ("report", ["report", str(case)]),
                (
                    "train --out",
                    ["train", str(preset), "--out", str(case), "--epochs", "1", *common],
                ),  # fmt: skip
                ("train --resume", ["train", "--resume", str(case), "--epochs", "3", *common]),
            ]
            for name, command in commands:
                before = digest(root, skip=root / "live")
                rss_peak_reset()
                baseline = rss_peak_mb()
                signal.alarm(HANG_SECONDS)
                try:
                    result = runner.invoke(app, command, catch_exceptions=True)
                except Hang:
                    defects.append(f"{label} {name}: hangs (over {HANG_SECONDS} s)")
                    continue
                finally:
                    signal.alarm(0)
                peak = rss_peak_mb() - baseline
                peaks.append(peak)
                if peak > BOUND_MB:
                    defects.append(f"{label} {name}: {peak:.0f} MB above the baseline")
                problem = outcome(result)
                outcomes[f"{name}: {'ran' if result.exit_code == 0 else 'refused'}"] += 1
                if problem is not None:
                    defects.append(f"{label} {name}: {problem}")
                after = digest(root, skip=root / "live")
                changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
                mine = f"{case.name}/"
                allowed = not locked and name in ("report", "train --out", "train --resume")
                wrong = sorted(k for k in changed if not (allowed and k.startswith(mine)))
                if wrong:
                    defects.append(f"{label} {name}: changed {wrong[:3]}")
                if base == "live" and name.startswith("train") and result.exit_code == 0:
                    defects.append(f"{label} {name}: trained in a live run's folder")
                if name == "runs --json" and result.exit_code == 0:
                    listed = {r["path"]: r for r in json.loads(result.stdout)}
                    if str(case) not in listed:
                        defects.append(f"{label}: not listed by runs")
                    elif (
                        locked
                        and (case / ".aecli-run.lock").is_file()
                        and listed[str(case)]["state"] != "running"
                    ):  # a lock file replaced under a live run: only state.json can tell
                        defects.append(f"{label}: listed as {listed[str(case)]['state']}")
            if (number + 1) % 25 == 0 and not locked:  # two resumes started at the same moment
                command = [sys.executable, "-m", "aecli", "train", "--resume", str(case),
                           "--epochs", "5", *common]  # fmt: skip
                first, second = (
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )  # fmt: skip
                    for _ in range(2)
                )
                errors = [p.communicate()[1] for p in (first, second)]
                codes = [first.returncode, second.returncode]
                busy = ["another aecli train is running" in e for e in errors]
                concurrent[f"exits {sorted(codes)}, {sum(busy)} refused as busy"] += 1
                if codes.count(0) == 2:  # the second may only start after the first has ended
                    defects.append(f"{label} concurrent resumes: both trained")
                for code, error in zip(codes, errors, strict=True):
                    lines = [x for x in error.splitlines() if x.startswith("error")]
                    if code != 0 and (len(lines) != 1 or "internal error" in error):
                        defects.append(f"{label} concurrent resume: {error.strip()[-200:]}")
                if (case / "metrics.jsonl").is_file():
                    records = RunDirectory(case).history()
                    seen = [r["epoch"] for r in records]
                    if len(seen) != len(set(seen)):
                        defects.append(f"{label} concurrent resumes: epochs {seen}")
            if base != "live":
                if locked:
                    ask_helper("unlock", case)
                shutil.rmtree(case)
            if user_file.read_bytes() != USER_NOTE:
                defects.append(f"{label}: the user's file outside the runs was changed")
                user_file.write_bytes(USER_NOTE)
            if (number + 1) % 100 == 0:
                print(f"{number + 1:,} cases, {time.perf_counter() - started:.0f} s, "
                      f"{len(defects)} defects", flush=True)  # fmt: skip
        seconds = time.perf_counter() - started
        live.send_signal(signal.SIGCONT)
        live.send_signal(signal.SIGINT)
        live.wait(timeout=120)
        helper.stdin.close()
        helper.wait()
        records = RunDirectory(root / "live").history()
        live_epochs = [r["epoch"] for r in records]
        if live_epochs != list(range(1, len(live_epochs) + 1)):
            defects.append(f"the live run's epochs: {live_epochs}")
        print(f"\n{args.cases:,} cases in {seconds:.0f} s (seed {args.seed})")
        print(f"damages: {dict(damages)}")
        print(f"commands: {dict(sorted(outcomes.items()))}")
        print(f"simultaneous resumes: {dict(concurrent)}")
        print(f"live run: {len(live_epochs)} epochs while the cases ran, each once, in order: "
              f"{live_epochs == list(range(1, len(live_epochs) + 1))}")  # fmt: skip
        finish(peaks, defects)


def finish(peaks: list[float], defects: list[str]) -> None:
    """Print the peak memory and the defects, grouped; exit 1 where there are any."""
    peaks = sorted(peaks) or [0.0]
    print(f"peak memory above the baseline: median {peaks[len(peaks) // 2]:.0f} MB, "
          f"largest {peaks[-1]:.0f} MB (bound {BOUND_MB} MB)")  # fmt: skip
    print(f"defects: {len(defects)}")
    for line, count in Counter(d.split(": ", 1)[1] for d in defects).most_common(25):
        print(f"  {count} x {line}")
    for line in defects[:10]:
        print(f"  e.g. {line}")
    sys.exit(1 if defects else 0)


if __name__ == "__main__":
    main()

"""Where a run stands: what `aecli runs` lists and the report's facts.

A folder is a run where it holds two of the files aecli train writes at its top; its state comes
from state.json, checked against the process that holds (or held) the run lock and against the
checkpoint, so that a run killed without a word is told from one still training.
"""

from __future__ import annotations

import math
import os
import shlex
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from aecli.io.checkpoint import read_train_state
from aecli.io.jsonfile import regular_file
from aecli.io.locks import lock_holder
from aecli.run.files import CHECKPOINT, FILES, RUN_LOCK, WEIGHTS, RunDirectory, RunState

STATES = ("running", "finished", "stopped", "interrupted", "failed")


@dataclass
class RunSummary:
    path: str
    preset: str
    data: str
    state: str  # one of STATES
    reason: str
    epochs_done: int
    epochs_planned: int | None
    best_val_psnr: float | None
    best_val_loss: float | None
    started: float  # seconds since the epoch
    resume: str | None  # the command that continues it, where one can

    def as_dict(self) -> dict:
        return asdict(self)


# what aecli train writes at the top of a run directory; a folder holding two of them is a run
# (one that lost a file or two to damage is still listed, and says what is missing)
RUN_FILES = ("config.yaml", "metrics.jsonl", "state.json", CHECKPOINT, WEIGHTS, "report.html")


def is_run(path: Path) -> bool:
    try:
        return _is_run_names(set(os.listdir(path)))
    except OSError:  # not a folder, or unreadable
        return False


def _is_run_names(names: set[str]) -> bool:
    return len(names.intersection(RUN_FILES)) >= 2


def find_runs(root: Path) -> list[RunSummary]:
    """The runs in `root` (itself a run, or a folder of runs at any depth, not following
    links), newest first."""
    found = []
    for folder, dirs, files in os.walk(root):
        if _is_run_names(set(dirs) | set(files)):
            found.append(Path(folder))
            dirs.clear()  # a run's own folders (grids) hold no runs
        else:
            dirs.sort()
    return sorted((summarize_run(p) for p in found), key=lambda r: r.started, reverse=True)


def training_process(run: RunDirectory, recorded: RunState | None = None) -> int | None:
    """The id of the process training in `run` now, or None: the holder of its run lock, or,
    where the lock file is not there (removed, or a folder copied without it), the
    process state.json names as running, if it is alive."""
    holder = lock_holder(run.path / RUN_LOCK)
    if holder is not None:
        return holder
    recorded = run.read_state() if recorded is None else recorded
    pid = recorded.pid
    if recorded.state == "running" and pid is not None and _alive(run, recorded):
        return pid
    return None


def _alive(run: RunDirectory, recorded: RunState) -> bool:
    """Whether the process that wrote `running` (and holds no lock on the folder) still
    exists: this process, or, where the lock file cannot tell (gone, or not on Linux), a
    process of that id (only knowable on its host, and not asked on Windows, where signal 0 is
    CTRL_C_EVENT)."""
    pid, host = recorded.pid, recorded.host or ""
    if host != socket.gethostname() or os.name == "nt" or pid is None or pid <= 0:
        return True
    if pid == os.getpid():  # the report written during training
        return True
    lock = run.path / RUN_LOCK
    if lock.is_file() and not lock.is_symlink() and os.uname().sysname == "Linux":
        return False  # the lock file is there and nobody holds it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summarize_run(path: Path, history: list[dict] | None = None, damage: str = "") -> RunSummary:
    """Where the run in `path` stands; `history`: its epoch records, where already read, and
    `damage`: what that reading left out (RunDirectory.damage)."""
    run = RunDirectory(path)
    recorded = run.read_state()
    if history is None:
        history, damage = run.history(), run.damage
    present, damaged = _run_files(run)
    has_checkpoint = CHECKPOINT in present
    state, reason = recorded.state, recorded.reason or ""
    config = _read_config(run)
    train = (config or {}).get("train")
    planned = recorded.epochs or (train.get("epochs") if isinstance(train, dict) else None)
    planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else None
    holder = training_process(run, recorded)
    if holder == os.getpid() and state != "running":
        # the report this process writes as its run ends: state.json is its own last word
        holder = None
    if holder is not None:  # a process trains in the folder now, whatever state.json says
        state, reason = "running", ""
    vanished = state == "running" and holder is None
    if vanished or state not in STATES:  # killed, or state.json missing or damaged
        # the checkpoint says whether everything was written before the process ended
        saved = read_train_state(run.checkpoint) if has_checkpoint else None
        ended = _ended(saved, planned) if saved is not None else None
        if ended is not None:
            state, reason = ended, ""
        else:
            state = "interrupted" if has_checkpoint else "failed"
            reason = "the process ended without a word (killed?)" if vanished else reason
    notes = [
        f"{name} missing"
        for name in ("config.yaml", "metrics.jsonl")
        if name not in present and name not in damaged
    ]
    notes += damaged.values()
    if config is None and "config.yaml" in present:
        notes.append("config.yaml damaged")
    if damage not in notes:
        notes.append(damage)
    reason = "; ".join(filter(None, [reason, *notes]))
    psnrs = [r["val_psnr"] for r in history if finite(r.get("val_psnr"))]
    losses = [r["val_loss"] for r in history if finite(r.get("val_loss"))]
    # where a run file is something else, --resume refuses the run until it is removed
    resumable = state in ("interrupted", "failed") and has_checkpoint and not damaged
    preset, data = recorded.preset, recorded.data
    if preset is None or data is None:  # state.json missing or damaged: the weights say
        found = _weights_facts(run)
        preset, data = preset or found.get("preset"), data or found.get("data")
    return RunSummary(
        path=str(path),
        preset=preset or "?",
        data=describe_source(data) if data is not None else "?",
        state=state,
        reason=reason,
        epochs_done=len(history),
        epochs_planned=planned,
        best_val_psnr=max(psnrs) if psnrs else None,
        best_val_loss=min(losses) if losses else None,
        started=recorded.started or _mtime(run),
        resume=f"aecli train --resume {shlex.quote(str(path))}" if resumable else None,
    )


def _run_files(run: RunDirectory) -> tuple[set[str], dict[str, str]]:
    """The names of the run's files that are there, and what is wrong with each that is there
    but is not a regular file (`state.json not a regular file (a FIFO)`), never opening one."""
    present, damaged = set(), {}
    for name in FILES:
        try:
            if regular_file(run.path / name):
                present.add(name)
        except ValueError as exc:
            damaged[name] = f"{name} {exc}"
    return present, damaged


def _ended(saved: dict, planned: int | None) -> str | None:
    """finished or stopped where a checkpoint's train_state says the run wrote everything (as
    `--resume` judges it: a checkpoint without `finished` is finished once its epochs are)."""
    if not saved.get("finished", True) or saved.get("batch", 1) != 0:
        return None
    if saved.get("stopped_early"):
        return "stopped"
    return "finished" if saved.get("epoch", 1) - 1 >= (planned or 0) else None


def describe_source(data: dict) -> str:
    """A data source as recorded in weights files and state.json, in words."""
    if data.get("kind") in ("diffusers", "single-file"):
        return data.get("path", "?")
    if data.get("kind") == "builtin-shapes":
        return f"built-in shapes ({data.get('count')} images)"
    if data.get("kind") == "shards":
        how = f"{data.get('shards', '?')} WebDataset shards, streamed"
    elif "streamed" in data:
        how = "streamed" if data["streamed"] else "in memory"
    else:  # a source that is always in memory (arrays, the built-in data, a weights file's)
        how = ""
    count = f"{data.get('count', '?')} images" + (f", {how}" if how else "")
    return f"{data.get('path', '?')} ({count})"


def finite(value) -> bool:
    """A number, neither NaN nor infinite (metrics.jsonl values may be null or anything)."""
    return isinstance(value, int | float) and math.isfinite(value)


def _mtime(run: RunDirectory) -> float:
    try:
        return max((p.lstat().st_mtime for p in run.path.iterdir()), default=0.0)
    except OSError:  # unreadable, or a file gone meanwhile: the listing goes on
        return 0.0


def _read_config(run: RunDirectory) -> dict | None:
    from aecli.config import parse_yaml
    from aecli.errors import AecliError

    path = run.path / "config.yaml"
    text = config_text(run)
    try:
        loaded = None if text is None else parse_yaml(text, str(path))
    except AecliError:  # damaged: the listing goes on without it
        return None
    return loaded if isinstance(loaded, dict) else None


def config_text(run: RunDirectory) -> str | None:
    """The run's config.yaml, or None where it is missing, not a regular file (a FIFO would
    block), unreadable, or not UTF-8."""
    from aecli.config import read_yaml_text
    from aecli.errors import AecliError

    path = run.path / "config.yaml"
    try:
        return read_yaml_text(path) if path.is_file() else None
    except AecliError:
        return None


def _weights_facts(run: RunDirectory) -> dict:
    """The preset and data the run's weights file records, where it has one."""
    from aecli.io.weights import read_weights_info

    try:
        if not regular_file(run.weights):  # a FIFO would block its reader
            return {}
        info = read_weights_info(run.weights)
    except Exception:  # noqa: BLE001  (no weights yet, or unreadable: the listing goes on)
        return {}
    return {"preset": info.preset, "data": info.data}

"""A run directory's files and its lock.

config.yaml, metrics.jsonl, grids/epoch-NNNN.png, model.safetensors, checkpoint.safetensors,
state.json (where the run stands: running, finished, stopped, interrupted, failed), report.html
and, at the end, samples.png and interpolation.png; every write but metrics.jsonl's appends is
atomic. Only rank 0 of a torchrun writes, holding the folder's lock for the run's life.

metrics.jsonl holds two kinds of records: one per epoch (`"kind": "epoch"`: the epoch's mean
training terms, the validation terms, lr, images/s) and one per logging window of
`train.log_every` steps (`"kind": "window"`: the window's mean training terms, lr, images/s).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator

from aecli.config import Config, dump_config
from aecli.errors import TrainingError, UsageError, os_reason
from aecli.io.atomic import atomic_write_text, stale_temp_files
from aecli.io.checkpoint import save_checkpoint
from aecli.io.images import save_png
from aecli.io.jsonfile import open_regular, read_json_file, read_lines, regular_file
from aecli.io.locks import FolderLock
from aecli.io.weights import save_weights
from aecli.models import Autoencoder

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
STATE = "state.json"
STATE_LIMIT = 1 << 20  # bytes: state.json is a few hundred
# bytes of one metrics.jsonl line: a record is a few hundred; a longer line ends the reading
METRICS_LINE_LIMIT = 1 << 16
# damaged metrics.jsonl lines read at most: a file with more is not a record of training
METRICS_DAMAGE_LIMIT = 1000
RUN_LOCK = ".aecli-run.lock"  # held by the process that trains in the folder (aecli.io.locks)
REPORT = "report.html"
SAMPLES = "samples.png"
INTERPOLATION = "interpolation.png"
# the files aecli writes at the top of a run directory, each replaced whole (metrics.jsonl
# appended to) and read back by --resume, `runs` and `report`
FILES = ("config.yaml", METRICS, STATE, CHECKPOINT, WEIGHTS, REPORT, SAMPLES, INTERPOLATION)


def is_epoch(record: dict) -> bool:
    return record["kind"] == "epoch"


class MetricsRecord(BaseModel):
    """One metrics.jsonl line: an epoch's or a logging window's figures, each a number or null
    (a term that was not finite)."""

    model_config = ConfigDict(strict=True, extra="allow")
    __pydantic_extra__: dict[str, int | float | None]

    kind: Literal["epoch", "window"]
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)


def _record(line: bytes) -> dict | None:
    """One metrics.jsonl line as the record aecli wrote (its keys in their order), or None for
    a line that is not one."""
    try:
        record = json.loads(line)
        MetricsRecord.model_validate(record)
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValidationError among them
        return None
    return record


def _or_absent(value: Any, handler) -> Any:
    """A state.json fact of another type than aecli writes (a damaged or edited file) is as if
    it were not there."""
    try:
        return handler(value)
    except ValidationError:
        return None


class RunState(BaseModel):
    """state.json: where a run stands (running, finished, stopped, interrupted, failed), what
    it trains and which process wrote it. Read leniently: a fact of the wrong type is None."""

    model_config = ConfigDict(strict=True, extra="allow")

    state: Annotated[str | None, WrapValidator(_or_absent)] = None
    reason: Annotated[str | None, WrapValidator(_or_absent)] = None
    epochs: Annotated[int | None, WrapValidator(_or_absent)] = None
    pid: Annotated[int | None, WrapValidator(_or_absent)] = None
    host: Annotated[str | None, WrapValidator(_or_absent)] = None
    started: Annotated[float | None, WrapValidator(_or_absent)] = None
    updated: Annotated[float | None, WrapValidator(_or_absent)] = None
    preset: Annotated[str | None, WrapValidator(_or_absent)] = None
    data: Annotated[dict[str, Any] | None, WrapValidator(_or_absent)] = None
    device: Annotated[str | None, WrapValidator(_or_absent)] = None
    execution: Annotated[str | None, WrapValidator(_or_absent)] = None


class RunDirectory:
    """The files of one training run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.weights = self.path / WEIGHTS
        self.checkpoint = self.path / CHECKPOINT
        self.metrics = self.path / METRICS
        self.grids = self.path / "grids"
        self.state = self.path / STATE
        self.report = self.path / REPORT
        self.samples = self.path / SAMPLES
        self.interpolation = self.path / INTERPOLATION
        self.damage = ""  # what the last records() left out of metrics.jsonl, in words

    def prepare(self, config: Config, *, fresh: bool) -> None:
        """Create the folders, remove what a killed run left half-written, write config.yaml,
        and start metrics.jsonl afresh for a new run."""
        self.check_files()
        self.grids.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.grids):
            for leftover in stale_temp_files(folder):
                leftover.unlink(missing_ok=True)
        self._replace(self.path / "config.yaml", dump_config(config))
        if fresh:  # in a folder a failed run left, nothing of it stays
            self._replace(self.metrics, "")
            self.state.unlink(missing_ok=True)

    def check_files(self) -> None:
        """Refuse, in one line naming it, a run file that is there but not a regular file: a
        FIFO in its place would block its reader forever, and its writer (which writes into a
        FIFO, as into `-o /dev/null`, rather than replace it)."""
        for name in FILES:
            self.writable(self.path / name)

    def writable(self, path: Path) -> Path:
        """`path`, where nothing but a regular file (or nothing) is there; else UsageError."""
        try:
            regular_file(path)
        except ValueError as exc:
            raise UsageError(
                f"{exc}; aecli writes only regular files in a run directory (remove it)",
                path=path,
            ) from None
        return path

    def _replace(self, path: Path, text: str) -> None:
        atomic_write_text(self.writable(path), text)

    def append_metrics(self, record: dict) -> None:
        with self.writable(self.metrics).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """Every record in metrics.jsonl, epochs and windows, in order; memory bounded by the
        records, whatever else the file holds. A line that is not a record aecli writes (cut
        short by a killed process, bad bytes, JSON that is not an object of numbers) is left
        out; a line longer than any record (gigabytes of NUL bytes), or more damaged lines
        than METRICS_DAMAGE_LIMIT, end the reading. `damage` says what was left out."""
        self.damage = ""
        try:
            handle = open_regular(self.metrics)
        except FileNotFoundError:
            return []
        except ValueError as exc:
            self.damage = f"{METRICS} {exc}"
            return []
        found, damaged, offset, stop = [], 0, 0, ""
        try:
            with handle:
                for line in read_lines(handle, METRICS_LINE_LIMIT):
                    if line is None:
                        stop = f"a line longer than {METRICS_LINE_LIMIT:,} bytes"
                        break
                    offset += len(line) + 1
                    record = _record(line)
                    if record is not None:
                        found.append(record)
                    elif line.strip():
                        damaged += 1
                        if damaged == METRICS_DAMAGE_LIMIT:
                            stop = f"{damaged:,} damaged lines"
                            break
        except OSError as exc:
            stop = f"cannot read: {os_reason(exc)}"
        parts = []
        if damaged:
            parts.append(f"{damaged} damaged line{'s' * (damaged != 1)} in {METRICS} skipped")
        if stop:
            parts.append(f"{METRICS} not read past byte {offset:,} ({stop})")
        self.damage = "; ".join(parts)
        return found

    def history(self) -> list[dict]:
        """Every epoch's record in metrics.jsonl."""
        return [r for r in self.records() if is_epoch(r)]

    def windows(self) -> list[dict]:
        """Every logging window's record in metrics.jsonl."""
        return [r for r in self.records() if not is_epoch(r)]

    def trim_history(self, before_epoch: int, after_step: int) -> None:
        """Drop what a resume trains again: the records of epochs from `before_epoch` on and
        the windows after step `after_step`."""
        if self.metrics.exists():
            kept = [
                r
                for r in self.records()
                if (r["epoch"] < before_epoch if is_epoch(r) else r["step"] <= after_step)
            ]
            self._replace(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def read_state(self) -> RunState:
        """state.json, empty where there is none (or it is not a JSON object)."""
        try:
            raw = read_json_file(self.state, STATE_LIMIT)
        except ValueError:
            raw = None
        return RunState.model_validate(raw if isinstance(raw, dict) else {})

    def write_state(self, state: str, **facts) -> None:
        """Record where the run stands; `running` also records this process, so that a run
        killed without a word can be told from one still training."""
        record = self.read_state().model_dump(exclude_none=True)
        record.update(facts, state=state, updated=time.time())
        if state == "running":
            record.update(pid=os.getpid(), host=socket.gethostname())
            record.setdefault("started", record["updated"])
            record.pop("reason", None)
        self._replace(self.state, json.dumps(record, indent=1) + "\n")

    def write_grid(self, epoch: int, sheet: np.ndarray) -> None:
        save_png(self.writable(self.grids / f"epoch-{epoch:04d}.png"), sheet)

    def save_weights(self, model: Autoencoder, config: Config, **facts) -> str:
        """model.safetensors (see aecli.io.weights.save_weights for `facts`); its fingerprint."""
        try:
            return save_weights(self.writable(self.weights), model, config, **facts)
        except ValueError as exc:  # non-finite weights: the previous file stays
            raise TrainingError(f"{exc}; stopped, the last good weights are kept") from None

    def save_checkpoint(self, state: dict) -> None:
        save_checkpoint(self.writable(self.checkpoint), state)

    def write_report(self) -> None:
        """report.html, built again from the run's files."""
        from aecli.run.report import write_report  # the report reads run directories

        write_report(self)


def run_lock(run_dir: Path, option: str) -> FolderLock:
    """The run folder's lock, or the one-line refusal naming the process that holds it."""
    refusal = f"{option} {run_dir}: another aecli train is running in this folder"
    return FolderLock(Path(run_dir), RUN_LOCK, refusal)

"""The run directory: its files, and what `--resume DIR` continues from it.

config.yaml, metrics.jsonl, grids/epoch-NNNN.png, model.safetensors, checkpoint.safetensors,
state.json (where the run stands: running, finished, stopped, interrupted, failed), report.html
and, at the end, samples.png and interpolation.png; every write but metrics.jsonl's appends is
atomic. Only rank 0 of a torchrun writes.

metrics.jsonl holds two kinds of records: one per epoch (`"kind": "epoch"`: the epoch's mean
training terms, the validation terms, lr, images/s) and one per logging window of
`train.log_every` steps (`"kind": "window"`: the window's mean training terms, lr, images/s).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aecli.config import Config, config_from_dict, dump_config, parse_yaml, read_yaml_text
from aecli.errors import TrainingError, UsageError, os_reason
from aecli.io.atomic import atomic_write_text, stale_temp_files
from aecli.io.checkpoint import load_checkpoint, save_checkpoint
from aecli.io.images import save_png
from aecli.io.jsonfile import open_regular, read_json_file, read_lines, regular_file
from aecli.io.weights import architecture_mismatch, save_weights
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


def _record(line: bytes) -> dict | None:
    """One metrics.jsonl line as the record aecli wrote, or None: a JSON object whose `kind`
    is epoch or window, whose epoch and step are whole numbers, and whose other values are
    numbers (or null)."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("kind") not in ("epoch", "window"):
        return None
    for key, value in record.items():
        whole = isinstance(value, int) and not isinstance(value, bool)
        if key in ("epoch", "step") and not (whole and value >= 0):
            return None
        if key != "kind" and not (value is None or isinstance(value, int | float)):
            return None
    return record if "epoch" in record and "step" in record else None


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

    def read_state(self) -> dict:
        """state.json, or {} where there is none (or it is damaged)."""
        try:
            state = read_json_file(self.state, STATE_LIMIT)
        except ValueError:
            return {}
        return state if isinstance(state, dict) else {}

    def write_state(self, state: str, **facts) -> None:
        """Record where the run stands; `running` also records this process, so that a run
        killed without a word can be told from one still training."""
        record = self.read_state()
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


@dataclass
class ResumePlan:
    """What `--resume DIR` continues: the run's config, preset name and data paths."""

    config: Config
    preset: str
    data_path: str | None
    checkpoint: dict
    val_data_path: str | None = None


def plan_resume(run_dir: Path, epochs: int | None = None) -> ResumePlan:
    """Read a run directory's config and checkpoint; `epochs` sets a new total."""
    config_path = Path(run_dir) / "config.yaml"
    run = RunDirectory(run_dir)
    if not config_path.exists():
        raise UsageError("--resume: not a run directory (no config.yaml)", path=run_dir)
    run.check_files()
    checkpoint = load_checkpoint(run.checkpoint)
    raw = parse_yaml(read_yaml_text(config_path), str(config_path))
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise UsageError("--resume: damaged config.yaml (not a preset)", path=config_path)
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    config = config_from_dict(raw, str(config_path))
    problem = architecture_mismatch(config, checkpoint["model"])
    if problem is not None:  # config.yaml edited to another architecture
        raise UsageError(
            f"--resume: config.yaml describes another model than the checkpoint holds ({problem}"
            "); restore the run's config.yaml, or train anew with --init",
            path=config_path,
        )
    state = checkpoint["train_state"]
    done = state["epoch"] - 1
    # all epochs trained (or stopped early) and the final weights written; a checkpoint from an
    # aecli that did not record `finished` counts as finished then, as it always did
    all_trained = state["stopped_early"] or (done >= config.train.epochs and state["batch"] == 0)
    if all_trained and state.get("finished", True):
        raise UsageError(
            f"--resume: this run already finished {done} epochs; pass --epochs N "
            "with a larger total to train on",
            path=run_dir,
        )
    return ResumePlan(
        config,
        checkpoint["preset"],
        checkpoint["data_path"],
        checkpoint,
        checkpoint.get("val_data_path"),
    )

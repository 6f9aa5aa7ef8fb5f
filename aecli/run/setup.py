"""Setting up a training run in one of its three start modes, phase by phase (as torchtune's
recipes do in `setup()`): a preset (bundled or a YAML file, with --set), the weights of --init
(with a PRESET, or their own architecture and settings), or a run directory to --resume. Each
mode settles the config and the run folder (made and locked, or the run's own), then the data
load is the same for all three.

The preset and every --set are read before torch loads, so that a typo is answered in a second
on a small machine: the modules that load torch are imported in the phases that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aecli.config import (
    Config,
    LoadedConfig,
    config_from_dict,
    load_config,
    override_config,
    parse_yaml,
    read_yaml_text,
)
from aecli.errors import UsageError
from aecli.io.outputs import is_within, make_folder, remove_if_empty

if TYPE_CHECKING:  # each loads torch
    import torch

    from aecli.data import TrainingData
    from aecli.engine import Reporter, Trainer, TrainResult
    from aecli.io.locks import FolderLock
    from aecli.io.weights import InitWeights, WeightsInfo


def main_process() -> bool:
    """Whether this process speaks and writes files: under torchrun only rank 0 does."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class TrainOptions:
    """What `aecli train` was asked, as given: the PRESET argument and the options."""

    preset: str | None = None
    data: Path | None = None
    val_data: Path | None = None
    out: Path | None = None
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, repeated
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    device: str = "auto"
    resume: Path | None = None
    data_changed: bool = False
    init: Path | None = None
    log_to: list[str] = field(default_factory=list)

    def settings(self) -> list[str]:
        """Every --set, then the shortcut options as the --set each stands for."""
        shortcuts = {
            "train.epochs": self.epochs,
            "train.batch_size": self.batch_size,
            "optim.lr": self.lr,
            "train.seed": self.seed,
            "train.log_to": json.dumps(self.log_to) if self.log_to else None,
        }
        return list(self.overrides) + [f"{k}={v}" for k, v in shortcuts.items() if v is not None]


@dataclass
class ResumePlan:
    """What `--resume DIR` continues: the run's config, preset name and data paths."""

    config: Config
    preset: str
    data_path: str | None
    checkpoint: dict
    val_data_path: str | None = None


@dataclass
class PreparedRun:
    """A run as its start mode settled it, with its device and data: ready to train."""

    config: Config
    name: str  # the preset's, or for imported VAE weights their file or folder name
    run_dir: Path
    data: str | Path | None
    val_data: str | Path | None
    plan: ResumePlan | None = None  # --resume: what it continues
    init: InitWeights | None = None  # --init: the tensors that fit
    created: Path | None = None  # the outermost folder this command made for the run
    lock: FolderLock | None = None  # the run folder's, where this command made the folder
    device: torch.device | None = None
    dataset: TrainingData | None = None
    reporter: Reporter | None = None
    # for --resume made by prepare (the data are checked before a word more), else by fit
    trainer: Trainer | None = None

    def fit(self) -> TrainResult:
        """Train the new run, or the restored one, writing the run directory."""
        from aecli.run.training import trainer_in

        trainer = self.trainer or trainer_in(
            self.config,
            self.dataset,
            self.run_dir,
            preset=self.name,
            device=self.device,
            reporter=self.reporter,
            data_path=None if self.data is None else str(Path(self.data).resolve()),
            val_data_path=None if self.val_data is None else str(Path(self.val_data).resolve()),
            init=None if self.init is None else self.init.tensors,
        )
        return trainer.fit()


@contextlib.contextmanager
def prepare(
    options: TrainOptions,
    *,
    reporter: Reporter,
    loading: Callable[[str], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[PreparedRun]:
    """The run `options` ask for, ready to train, its run folder locked until the `with` ends.
    `reporter` hears of skipped images and then of the training; `loading("loading data")`
    is entered while the data load."""
    # the preset and every --set, read (and refused in one line) before torch loads; only a
    # run from --init weights without a PRESET takes its settings from those weights
    from_preset = options.resume is None and (options.init is None or options.preset is not None)
    loaded = load_config(options.preset, options.settings()) if from_preset else None
    from aecli.devices import resolve_device

    with contextlib.ExitStack() as held:  # the run folder's lock, for the run's life
        device = resolve_device(options.device)  # checked before the data loads
        if options.data_changed and options.resume is None:
            raise UsageError("--data-changed goes with --resume RUN")
        if options.resume is not None:
            run = _setup_resume(options, held)
        else:
            run = _setup_new_run(options, loaded, held)
        run.device, run.reporter = device, reporter
        run.dataset = _setup_data(run, loading)
        for failure in run.dataset.skipped:
            reporter.notice(f"skipped {failure.path}: {failure.reason}")
        if run.plan is not None:  # data other than the checkpoint's are refused before a word more
            from aecli.run.training import resumed

            run.trainer = resumed(
                run.plan,
                run.dataset,
                run.run_dir,
                data_changed=options.data_changed,
                device=device,
                reporter=reporter,
            )
        yield run


def _setup_resume(options: TrainOptions, held: contextlib.ExitStack) -> PreparedRun:
    """--resume RUN: the run's own config and data, its folder locked; only --epochs, --data,
    --val-data, --device and --log-to may change."""
    from aecli.run.files import run_lock

    given = (
        ("PRESET", options.preset),
        ("--init", options.init),
        ("--out", options.out),
        ("--set", options.overrides),
        ("--batch-size", options.batch_size),
        ("--lr", options.lr),
        ("--seed", options.seed),
    )
    extra = [flag for flag, value in given if value]
    if extra:
        raise UsageError(
            f"--resume continues a run with its own config; drop {extra[0]} "
            "(only --epochs, --data and --device may change)"
        )
    run_dir = options.resume
    if main_process():
        held.enter_context(run_lock(run_dir, "--resume"))
    plan = plan_resume(run_dir, options.epochs)
    if options.log_to:
        plan.config = _with_log_to(plan.config, options.log_to)
    data = options.data if options.data is not None else plan.data_path
    val_data = options.val_data if options.val_data is not None else plan.val_data_path
    _check_outside_data(run_dir, data, "--resume")
    return PreparedRun(plan.config, plan.preset, run_dir, data, val_data, plan=plan)


def _setup_new_run(
    options: TrainOptions, loaded: LoadedConfig | None, held: contextlib.ExitStack
) -> PreparedRun:
    """A preset, or --init weights: the config, what can be refused before any data is read
    (LPIPS or TensorBoard missing, weights of another architecture), and a new run folder,
    made and locked."""
    from aecli.io.weights import init_weights, read_weights
    from aecli.run.files import run_lock

    init = options.init
    stored, init_tensors = read_weights(init) if init is not None else (None, None)
    if loaded is None:  # --init without a PRESET: the weights' own architecture and settings
        raw = stored.config.model_dump(mode="json")
        loaded = override_config(raw, _init_name(init, stored), str(init), options.settings())
    config, name = loaded.config, loaded.name
    if config.loss.perceptual_weight:  # the LPIPS weights, before any data is read
        from aecli.perceptual import check_available

        check_available()
    start = init_weights(init, init_tensors, config) if init_tensors is not None else None
    if "tensorboard" in config.train.log_to:  # before any data is read
        from aecli.engine.tensorboard import check_available as check_tensorboard

        check_tensorboard()
    run_dir = options.out or Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    _check_outside_data(run_dir, options.data, "--out")
    # a path that cannot be a folder fails now, not after the data has loaded
    created = make_folder(run_dir, "--out")
    lock = None
    if main_process():  # a live run is named as such, before what its files say
        lock = held.enter_context(run_lock(run_dir, "--out"))
    _check_run_dir(run_dir)
    return PreparedRun(
        config,
        name,
        run_dir,
        options.data,
        options.val_data,
        init=start,
        created=created,
        lock=lock,
    )


def _setup_data(
    run: PreparedRun, loading: Callable[[str], contextlib.AbstractContextManager]
) -> TrainingData:
    """The run's data, loaded alike in every start mode; where they fail, a run folder this
    command made goes again, its lock file with it."""
    from aecli.data import load_data

    config = run.config
    try:
        with loading("loading data"):
            return load_data(run.data, config.data, config.train.seed, validation=run.val_data)
    except BaseException:
        if run.created is not None:
            if run.lock is not None:
                run.lock.release(remove=True)
            remove_if_empty(run.run_dir, run.created)
        raise


def plan_resume(run_dir: Path, epochs: int | None = None) -> ResumePlan:
    """Read a run directory's config and checkpoint; `epochs` sets a new total."""
    from aecli.io.checkpoint import load_checkpoint
    from aecli.io.weights import architecture_mismatch
    from aecli.run.files import RunDirectory

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


def _with_log_to(config: Config, log_to: list[str]) -> Config:
    """The run's config with --log-to given on resume (logging only: results are the same)."""
    from aecli.engine.tensorboard import check_available as check_tensorboard

    raw = config.model_dump(mode="json")
    raw["train"]["log_to"] = list(log_to)
    config = config_from_dict(raw, "--log-to")
    if "tensorboard" in config.train.log_to:
        check_tensorboard()
    return config


def _init_name(init: Path, stored: WeightsInfo) -> str:
    """A run's name when it takes its config from --init weights: their preset, or for an
    imported VAE the file or folder name."""
    if stored.data.get("kind") in ("diffusers", "single-file"):
        return Path(init).resolve().stem or "vae"
    return stored.preset


def _check_outside_data(run_dir: Path, data: str | Path | None, option: str) -> None:
    """A run directory inside its data folder would feed its own grids back as training data."""
    if data is not None and Path(data).is_dir() and is_within(run_dir, data):
        raise UsageError(
            f"{option}: the run directory {run_dir} is inside the data folder {data}; its grids "
            "would become training data, choose a run directory outside it"
        )


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds a run's weights or checkpoint; one left by a run that died
    before it saved anything is reused."""
    from aecli.run.files import CHECKPOINT, WEIGHTS, RunDirectory

    run = RunDirectory(run_dir)
    run.check_files()  # a FIFO in a run file's place: refused before the data load, not after
    if (run_dir / CHECKPOINT).exists():
        raise UsageError(
            f"--out: already holds a training run with a checkpoint; continue it with "
            f"`aecli train --resume {run_dir}`, or choose a new directory",
            path=run_dir,
        )
    if (run_dir / WEIGHTS).exists():
        raise UsageError(
            "--out: already holds a trained model; choose a new directory", path=run_dir
        )
    trained = len(run.history())
    if trained:  # its checkpoint is gone, but its record of training is worth keeping
        raise UsageError(
            f"--out: already holds a training run's metrics.jsonl ({trained} epochs, no "
            "checkpoint to resume from); choose a new directory",
            path=run_dir,
        )

"""Training in a run directory: the engine's loop, writing through the run's files.

The engine knows a run only as the files it writes (aecli.engine.RunFiles); here a path becomes
those files, so that `train(config, data, "runs/x", preset=...)` is a whole run: config.yaml,
metrics, grids, weights, checkpoint, state.json and report.html.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aecli import engine
from aecli.config import Config
from aecli.run.files import RunDirectory
from aecli.run.setup import ResumePlan

if TYPE_CHECKING:
    from aecli.data import TrainingData


def trainer_in(
    config: Config, data: TrainingData, run_dir: str | Path, **options
) -> engine.Trainer:
    """The engine's Trainer writing the run directory at `run_dir` (its RunDirectory);
    `options` are the engine Trainer's keywords: preset (required), device, reporter,
    data_path, val_data_path, init."""
    return engine.Trainer(config, data, RunDirectory(run_dir), **options)


def train(config: Config, data: TrainingData, run_dir: str | Path, **options) -> engine.TrainResult:
    """Train a model on `data` and write the run directory `run_dir` (options: Trainer's)."""
    return trainer_in(config, data, run_dir, **options).fit()


def resumed(
    plan: ResumePlan,
    data: TrainingData,
    run_dir: str | Path,
    *,
    data_changed: bool = False,
    **options,
) -> engine.Trainer:
    """A trainer restored to where a planned run stopped, before it trains (options: device,
    reporter); `data_changed` accepts data other than those the checkpoint trained on."""
    trainer = trainer_in(
        plan.config,
        data,
        run_dir,
        preset=plan.preset,
        data_path=plan.data_path,
        val_data_path=plan.val_data_path,
        **options,
    )
    trainer.restore(plan.checkpoint, data_changed=data_changed)
    return trainer


def resume(
    plan: ResumePlan, data: TrainingData, run_dir: str | Path, **options
) -> engine.TrainResult:
    """Continue a planned run (options: data_changed, device, reporter)."""
    return resumed(plan, data, run_dir, **options).fit()

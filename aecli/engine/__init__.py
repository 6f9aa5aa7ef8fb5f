"""The training engine: the only training loop, for every preset, device and process count.

`trainer` is the loop (epochs, validation, early stopping, final weights, Ctrl-C), `step` one
optimiser step, `rundir` the run directory's files and resume planning, `distributed` the
torchrun process group.
"""

from aecli.engine.rundir import CHECKPOINT, WEIGHTS, ResumePlan, RunDirectory, plan_resume
from aecli.engine.step import TrainStep, learning_rate, load_optimizer_state, step_seed
from aecli.engine.trainer import (
    Reporter,
    SilentReporter,
    Trainer,
    TrainResult,
    TrainState,
    resume,
    train,
)

__all__ = [
    "CHECKPOINT",
    "WEIGHTS",
    "Reporter",
    "ResumePlan",
    "RunDirectory",
    "SilentReporter",
    "TrainResult",
    "TrainState",
    "TrainStep",
    "Trainer",
    "learning_rate",
    "load_optimizer_state",
    "plan_resume",
    "resume",
    "step_seed",
    "train",
]

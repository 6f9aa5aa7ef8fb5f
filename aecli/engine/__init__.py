"""The training engine: the only training loop, for every preset, device and process count.

`trainer` is the loop (epochs, validation, early stopping, final weights, Ctrl-C), writing
through the run files its caller gives it (aecli.run); `step` one optimiser step;
`distributed` the torchrun process group.
"""

from aecli.engine.step import TrainStep, learning_rate, load_optimizer_state, step_seed
from aecli.engine.trainer import (
    Reporter,
    RunFiles,
    SilentReporter,
    Trainer,
    TrainResult,
    TrainState,
)

__all__ = [
    "Reporter",
    "RunFiles",
    "SilentReporter",
    "TrainResult",
    "TrainState",
    "TrainStep",
    "Trainer",
    "learning_rate",
    "load_optimizer_state",
    "step_seed",
]

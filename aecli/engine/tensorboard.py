"""TensorBoard event files for a run (`train.log_to: [tensorboard]`): every metrics.jsonl field
as a scalar at its step (`epoch/<field>` for the epoch records, `window/<field>` for the logging
windows) and the validation grids and final previews as images, under RUN/tensorboard.

It needs the `tensorboard` package (the optional extra); without it the run stops before
training with one line saying how to install it. Rank 0 only under torchrun.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aecli.errors import ConfigError

FOLDER = "tensorboard"
INSTALL = "pip install 'aecli[tensorboard]' (or: pip install tensorboard)"


def check_available() -> None:
    """One line saying how to install tensorboard when it is missing, or nothing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            [f"train.log_to: tensorboard needs the tensorboard package, not installed: {INSTALL}"]
        ) from None


class TensorBoardLog:
    """A SummaryWriter on RUN/tensorboard. On resume (`from_step` > 0) the events after that
    step, which the resumed run writes again, are dropped (TensorBoard's purge_step)."""

    def __init__(self, run_dir: Path, from_step: int = 0):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / FOLDER), purge_step=from_step or None)

    def record(self, record: dict) -> None:
        group = record.get("kind", "epoch")
        for key, value in record.items():
            if key in ("kind", "epoch", "step") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self.writer.add_scalar(f"{group}/{key}", value, record["step"])
        self.writer.flush()

    def image(self, tag: str, sheet: np.ndarray, step: int) -> None:
        """A uint8 (H, W, C) sheet."""
        self.writer.add_image(tag, sheet, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

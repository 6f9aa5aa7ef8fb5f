"""Where the model runs and how: device choice, bf16 autocast and memory format on CUDA.

Training and inference share these so that a model runs the same way in both.
"""

from __future__ import annotations

import contextlib

import torch

from aecli.errors import UsageError


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) picks CUDA when present; an explicit device must exist."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: aecli runs on cpu or cuda")
    return device


class Execution:
    """bf16 autocast (precision `bf16`, or `auto` on CUDA) and channels-last on CUDA."""

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        cuda = device.type == "cuda"
        use_bf16 = precision == "bf16" or (precision == "auto" and cuda)
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

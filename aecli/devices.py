"""Where the model runs and how: device choice, bf16 autocast and memory format on CUDA.

Training and inference share these so that a model runs the same way in both.
"""

from __future__ import annotations

import contextlib

import torch

from aecli.data.transforms import to_model_range
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


def describe(device: torch.device) -> str:
    """The device for reports: `cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu (2 threads)`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


class Execution:
    """bf16 autocast (precision `bf16`, or `auto` on CUDA) and channels-last on CUDA."""

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        cuda = device.type == "cuda"
        use_bf16 = precision == "bf16" or (precision == "auto" and cuda)
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format

    def prepare(self, images: torch.Tensor, value_range: str) -> torch.Tensor:
        """uint8 (B, C, H, W) anywhere -> model-range floats on the device, in its memory format
        (from the CPU through pinned memory, without blocking, on CUDA)."""
        if images.device != self.device:
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
        x = to_model_range(images, value_range)
        return x.contiguous(memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

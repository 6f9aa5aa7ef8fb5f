"""Per-batch work on the device: model-range floats back to images, and augmentation. The way
in, uint8 to the model's range, is the device's (aecli.devices.to_model_range)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aecli.config import AugmentConfig


def to_unit(x: torch.Tensor, value_range: str) -> torch.Tensor:
    """Model-range floats back to [0, 1], clamped (for images, PSNR and grids)."""
    if value_range == "symmetric":
        x = (x + 1.0) / 2.0
    return x.clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor, value_range: str) -> torch.Tensor:
    return to_unit(x.float(), value_range).mul(255.0).round().to(torch.uint8)


def augment(x: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Random horizontal flips and random resized crops, per image, in one batched resample.

    Draws from the global RNG, which the engine seeds per step.
    """
    if not config.hflip and config.crop_scale is None:
        return x
    b = x.shape[0]
    flip = torch.ones(b, device=x.device)
    if config.hflip:
        flip = torch.where(torch.rand(b, device=x.device) < 0.5, -1.0, 1.0)
    if config.crop_scale is None:
        return torch.where(flip.view(b, 1, 1, 1) < 0, x.flip(-1), x)
    low, high = config.crop_scale
    side = torch.sqrt(torch.empty(b, device=x.device).uniform_(low, high))  # area -> side
    tx = (torch.rand(b, device=x.device) * 2 - 1) * (1 - side)
    ty = (torch.rand(b, device=x.device) * 2 - 1) * (1 - side)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = side * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = side
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

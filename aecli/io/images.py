"""Writing PNGs and image grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aecli.io.atomic import atomic_write_bytes


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in 1 or 3 -> PNG bytes."""
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str | Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(array))


def make_grid(rows: list[torch.Tensor], pad: int = 2, min_tile: int = 64) -> np.ndarray:
    """Stack rows of uint8 (N, C, H, W) images into one (H, W, C) sheet, one row each.

    Small images are enlarged by an integer factor (nearest) so that tiles are at least
    `min_tile` pixels: a 28x28 digit is readable on screen.
    """
    n = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    factor = max(1, -(-min_tile // max(h, w)))
    th, tw = h * factor, w * factor
    sheet = torch.full(
        (c, pad + len(rows) * (th + pad), pad + n * (tw + pad)), 255, dtype=torch.uint8
    )
    for i, row in enumerate(rows):
        big = row.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
        for j, tile in enumerate(big):
            top, left = pad + i * (th + pad), pad + j * (tw + pad)
            sheet[:, top : top + th, left : left + tw] = tile
    return sheet.permute(1, 2, 0).contiguous().numpy()

"""Tiled encoding and decoding: a fully convolutional model applied to overlapping tiles of an
image (or latent) so that peak memory follows the tile, not the image.

Each output pixel comes from the tile whose core holds it (the tiles' cores partition the
input); across each core edge neighbours blend linearly over half the overlap, so no seam shows,
and no tile contributes pixels near its own edge, where missing context spoils them.

GroupNorm is what makes naive tiling show: each tile would normalise with its own statistics
and come out in its own tone. Here every GroupNorm uses one set of statistics for the whole
input, measured on the input shrunk to the area of one tile (the "fast" estimate of
multidiffusion-upscaler's Tiled VAE). Self-attention sees one tile at a time, as in diffusers'
tiled VAE. Measured figures: docs/benchmarks.md, Tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aecli.models.tile_ops import normalise

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tiling:
    """Tiles of `size` x `size` input pixels sharing `overlap` pixels with each neighbour."""

    size: int
    overlap: int

    def scaled(self, factor: int) -> Tiling:
        """The same tiling in the units of an input `factor` times smaller (a latent)."""
        return Tiling(self.size // factor, self.overlap // factor)


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: a stride of tile - overlap, the last tile flush with the
    end (so every tile has the full size when the input is at least a tile long)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    found = list(range(0, length - tile, stride))
    return [*found, length - tile]


def cores(length: int, offsets: list[int], tile: int) -> list[tuple[int, int]]:
    """Each tile's share of the axis (a partition): from the middle of its overlap with the
    previous tile to the middle of its overlap with the next."""
    ends = [min(o + tile, length) for o in offsets]
    bounds = [0] + [(offsets[i + 1] + ends[i]) // 2 for i in range(len(offsets) - 1)] + [length]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def blend(length: int, core: tuple[int, int], band: float, device) -> torch.Tensor:
    """A tile's weights along one axis (in its own coordinates): 1 over its core, 0 beyond,
    linear over `band` pixels centred on each core edge that borders another tile. Neighbours'
    weights sum to 1, and no tile contributes pixels closer than (overlap - band) / 2 to its
    own edge, where missing context spoils them."""
    position = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    start, end = core
    weight = torch.ones(length, device=device)
    if start > 0:
        weight = weight.minimum(
            ((position - start) / band + 0.5).clamp(0, 1) if band else (position >= start).float()
        )
    if end < length:
        weight = weight.minimum(
            ((end - position) / band + 0.5).clamp(0, 1) if band else (position < end).float()
        )
    return weight


def tiled(
    fn: Fn,
    module: nn.Module,
    x: torch.Tensor,
    tiling: Tiling,
    *,
    scale: float,
    batch_size: int,
) -> torch.Tensor:
    """fn(x) for one input (1, C, H, W), computed tile by tile; fn maps (B, C, t, t) to
    (B, C', t * scale, t * scale). `module` holds the GroupNorms that fn runs."""
    h, w = x.shape[-2:]
    tile = tiling.size
    ys, xs = starts(h, tile, tiling.overlap), starts(w, tile, tiling.overlap)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    boxes = [(y, x0) for y in ys for x0 in xs]
    core_y, core_x = cores(h, ys, tile), cores(w, xs, tile)
    core_boxes = [(cy, cx) for cy in core_y for cx in core_x]
    stats = _estimate(fn, norms, x, tile) if norms else None
    out = None
    band = tiling.overlap / 2 * scale
    with _norm_statistics(norms, stats):
        for chunk in _chunks(len(boxes), batch_size):
            y = fn(_crop(x, [boxes[i] for i in chunk], tile)).float()  # (B, C', t*s, t*s)
            if out is None:
                out = y.new_zeros(1, y.shape[1], round(h * scale), round(w * scale))
            for j, i in enumerate(chunk):
                top, left = boxes[i]
                y0, y1, x0, x1 = (c * scale for c in _relative(core_boxes[i], boxes[i]))
                th, tw = round(min(tile, h - top) * scale), round(min(tile, w - left) * scale)
                mask = (
                    blend(th, (y0, y1), band, y.device)[:, None]
                    * blend(tw, (x0, x1), band, y.device)[None, :]
                )
                oy, ox = round(top * scale), round(left * scale)
                out[..., oy : oy + th, ox : ox + tw] += y[j, :, :th, :tw] * mask
    return out


def _chunks(count: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, count))) for i in range(0, count, size)]


def _crop(x: torch.Tensor, boxes: list[tuple[int, int]], tile: int) -> torch.Tensor:
    return torch.cat([x[..., y : y + tile, x0 : x0 + tile] for y, x0 in boxes])


def _relative(core: tuple, box: tuple[int, int]) -> tuple[int, int, int, int]:
    """A tile's core (y0, y1, x0, x1) in the tile's own coordinates."""
    (y0, y1), (x0, x1) = core
    return y0 - box[0], y1 - box[0], x0 - box[1], x1 - box[1]


def _estimate(fn: Fn, norms: list[nn.GroupNorm], x: torch.Tensor, tile: int) -> list:
    """Every GroupNorm's statistics over the whole input, estimated by running the input
    shrunk (area averaging) to the area of one tile."""
    h, w = x.shape[-2:]
    shrink = max(1.0, math.sqrt(h * w) / tile)
    size = (max(1, round(h / shrink)), max(1, round(w / shrink)))
    return statistics(fn, norms, F.interpolate(x, size=size, mode="area"))


def statistics(fn: Fn, norms: list[nn.GroupNorm], x: torch.Tensor) -> list:
    """Each GroupNorm's per-group (mean, variance) of its input when fn runs on one input x
    (1, C, H, W), as float32 tensors on x's device."""
    found: list = [None] * len(norms)

    def recorder(index: int):
        def record(_module, inputs):
            values = inputs[0].float().reshape(norms[index].num_groups, -1)
            var, mean = torch.var_mean(values, dim=1, correction=0)
            found[index] = (mean, var)

        return record

    handles = [norm.register_forward_pre_hook(recorder(i)) for i, norm in enumerate(norms)]
    try:
        fn(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


@contextmanager
def _norm_statistics(norms: list[nn.GroupNorm], stats: list | None):
    """GroupNorms that normalise with `stats` (per group mean and variance, from
    `statistics`) instead of their input's own."""
    if stats is None:
        yield
        return
    for norm, fixed in zip(norms, stats, strict=True):
        if fixed is not None:
            norm.forward = _fixed_forward(norm, *fixed)
    try:
        yield
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)  # back to GroupNorm.forward


def _fixed_forward(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    return lambda x: normalise(x, mean, var, norm.eps, weight, bias)

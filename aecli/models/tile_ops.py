"""The steps exact tiling is made of (aecli.tiling.exact runs them): each an operation that
computes a window of its output from a window of its input, with its geometry along each axis,
and the whole-tensor moments a GroupNorm stage normalises with.

They live with the models because every block says how it tiles where it is written, in these
terms (`tile(t)` with `Conv.of`, `Pointwise`, `PixelShuffle`, `PixelUnshuffle`, `Upsample`,
`Uses`): the models stand on them, and the tiled runner stands on the models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from aecli.models import blocks

LAST = torch.channels_last


class NotTileable(ValueError):
    """A module the exact tiled run does not know (a model that is not fully convolutional)."""


# -- operations: one local step of a stage, with its geometry along each axis ----------------
#
# Along one axis, an operation maps an input of length n to an output of `size(n)`; `need`
# gives the input range [lo, hi) (clamped to the input) that outputs [a, b) depend on;
# `params` what `run` needs to compute exactly [a, b) from the input crop [lo, hi) (also the
# key under which tiles of the same geometry run as one batch).


class Op:
    zoom = Fraction(1)  # output pixels per input pixel

    def size(self, n: int, axis: int) -> int:
        return n

    def need(self, a: int, b: int, n: int, axis: int) -> tuple[int, int]:
        return a, b

    def params(self, lo: int, hi: int, a: int, b: int, n: int, axis: int) -> tuple:
        return ()

    def run(self, x: torch.Tensor, rows: tuple, cols: tuple, context: dict) -> torch.Tensor:
        raise NotImplementedError


class Pointwise(Op):
    """An activation, dropout (identity at inference), BatchNorm at inference, the output
    activation: each output pixel from the same input pixel."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def run(self, x, rows, cols, context):
        return self.fn(x)


class Conv(Op):
    """nn.Conv2d, its zero padding applied where the whole input ends (TensorFlow `same`
    padding computed from the whole input's size). `Conv.of` takes the weights and the padding
    (before, after) of each axis directly: a causal 3-D convolution's last time slice, an
    asymmetric padding."""

    def __init__(self, conv: nn.Conv2d, tf_same: bool = False):
        if conv.padding_mode != "zeros" or tuple(conv.dilation) != (1, 1):
            raise NotTileable("a convolution with dilation or non-zero padding")
        if isinstance(conv.padding, str):
            raise NotTileable(f"a convolution with padding {conv.padding!r}")
        self.conv, self.tf_same = conv, tf_same
        self.kernel, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.zoom = Fraction(1, self.stride[0])
        self.pads = tuple((p, p) for p in conv.padding)

    @classmethod
    def of(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int = 1,
        pads: tuple[tuple[int, int], tuple[int, int]] | int = 0,
        groups: int = 1,
    ) -> Conv:
        """A 2-D convolution of `weight` (O, I / groups, kh, kw) with `pads` ((top, bottom),
        (left, right)), or one number for every side, as zeros where the whole input ends."""
        op = cls.__new__(cls)
        op.conv = _Weights(weight, bias, (stride, stride), groups)
        op.tf_same = False
        op.kernel, op.stride = tuple(weight.shape[-2:]), (stride, stride)
        op.zoom = Fraction(1, stride)
        op.pads = ((pads, pads), (pads, pads)) if isinstance(pads, int) else tuple(pads)
        return op

    def _pads(self, n: int, axis: int) -> tuple[int, int]:
        if self.tf_same:
            return blocks.same_padding(n, self.kernel[axis], self.stride[axis])
        return self.pads[axis]

    def size(self, n, axis):
        before, after = self._pads(n, axis)
        return (n + before + after - self.kernel[axis]) // self.stride[axis] + 1

    def _raw(self, a, b, n, axis) -> tuple[int, int]:
        """The padded input's range for outputs [a, b), in the input's coordinates."""
        before = self._pads(n, axis)[0]
        s = self.stride[axis]
        return a * s - before, (b - 1) * s - before + self.kernel[axis]

    def need(self, a, b, n, axis):
        start, end = self._raw(a, b, n, axis)
        return max(0, start), min(n, end)

    def params(self, lo, hi, a, b, n, axis):
        start, end = self._raw(a, b, n, axis)
        return lo - start, end - hi  # zeros to add before and after the crop

    def run(self, x, rows, cols, context):
        if any(rows) or any(cols):
            x = F.pad(x, (cols[0], cols[1], rows[0], rows[1]))
        conv = self.conv
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)


@dataclass
class _Weights:
    """What Conv.run reads of an nn.Conv2d, for a convolution given by its tensors."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    groups: int


class PixelUnshuffle(Op):
    """F.pixel_unshuffle by `factor`: each output pixel from a factor x factor input patch."""

    def __init__(self, factor: int):
        self.factor = factor
        self.zoom = Fraction(1, factor)

    def size(self, n, axis):
        if n % self.factor:
            raise NotTileable(f"a pixel unshuffle by {self.factor} of {n} pixels")
        return n // self.factor

    def need(self, a, b, n, axis):
        return a * self.factor, b * self.factor

    def run(self, x, rows, cols, context):
        return F.pixel_unshuffle(x, self.factor)


class PixelShuffle(Op):
    """F.pixel_shuffle by `factor`: each output pixel from one input pixel's channels."""

    def __init__(self, factor: int):
        self.factor = factor
        self.zoom = Fraction(factor)

    def size(self, n, axis):
        return n * self.factor

    def need(self, a, b, n, axis):
        f = self.factor
        return a // f, (b - 1) // f + 1

    def params(self, lo, hi, a, b, n, axis):
        return a - lo * self.factor, b - lo * self.factor

    def run(self, x, rows, cols, context):
        return F.pixel_shuffle(x, self.factor)[..., rows[0] : rows[1], cols[0] : cols[1]]


class Uses(Op):
    """A pixel-by-pixel step that also reads statistics gathered over a whole parked tensor
    (`t.gather`): fn(x, reducer) with the reducer `name` of tensor `source`."""

    def __init__(self, fn: Callable, source: int, name: str):
        self.fn, self.source, self.name = fn, source, name

    def run(self, x, rows, cols, context):
        return self.fn(x, context["stats"][self.source][self.name])


class ConvTranspose(Op):
    """nn.ConvTranspose2d followed by the block's crop (Keras `same`)."""

    def __init__(self, conv: nn.ConvTranspose2d, crop: tuple[int, int]):
        if tuple(conv.dilation) != (1, 1):
            raise NotTileable("a transposed convolution with dilation")
        self.conv, self.crop = conv, crop
        self.kernel, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.extra = tuple(conv.padding), tuple(conv.output_padding)
        self.zoom = Fraction(self.stride[0])

    def size(self, n, axis):
        k, s, p = self.kernel[axis], self.stride[axis], self.padding[axis]
        return (n - 1) * s - 2 * p + k + self.extra[axis] - sum(self.crop)

    def _raw(self, a, b, axis) -> tuple[int, int]:
        """Outputs [a, b) in the coordinates of the unpadded, uncropped transposed output."""
        shift = self.crop[0] + self.padding[axis]
        return a + shift, b + shift

    def need(self, a, b, n, axis):
        k, s = self.kernel[axis], self.stride[axis]
        start, end = self._raw(a, b, axis)
        lo = min(max(0, -(-(start - k + 1) // s)), n - 1)
        return lo, max(lo + 1, min(n, (end - 1) // s + 1))

    def params(self, lo, hi, a, b, n, axis):
        start, end = self._raw(a, b, axis)
        length = (hi - lo - 1) * self.stride[axis] + self.kernel[axis]
        return lo * self.stride[axis] - start, end - lo * self.stride[axis] - length

    def run(self, x, rows, cols, context):
        conv = self.conv
        y = F.conv_transpose2d(x, conv.weight, None, conv.stride, 0, 0, conv.groups)
        y = F.pad(y, (cols[0], cols[1], rows[0], rows[1]))  # negative: a crop
        return y if conv.bias is None else y + conv.bias.reshape(1, -1, 1, 1).to(y.dtype)


class Upsample(Op):
    """blocks.Upsample: nearest or bilinear by a whole factor."""

    def __init__(self, module: blocks.Upsample):
        self.factor, self.mode = module.factor, module.mode
        self.zoom = Fraction(module.factor)
        self.reach = 0 if module.mode == "nearest" else 1  # input pixels beyond the nearest

    def size(self, n, axis):
        return n * self.factor

    def need(self, a, b, n, axis):
        f = self.factor
        return max(0, a // f - self.reach), min(n, (b - 1) // f + 1 + self.reach)

    def params(self, lo, hi, a, b, n, axis):
        return a - lo * self.factor, b - lo * self.factor

    def run(self, x, rows, cols, context):
        y = F.interpolate(x, scale_factor=self.factor, mode=self.mode)
        return y[..., rows[0] : rows[1], cols[0] : cols[1]]


class Local(Op):
    """A block that declares its `halo` (blocks.TinyBlock): its outputs depend on the input
    within `halo` pixels at the same resolution and on nothing else (no norms). Its own forward
    runs on the crop; the pixels within `halo` of a crop edge inside the image are discarded,
    and at the image's edges the block's own padding is the image's."""

    def __init__(self, module: nn.Module):
        self.module, self.halo = module, module.halo

    def need(self, a, b, n, axis):
        return max(0, a - self.halo), min(n, b + self.halo)

    def params(self, lo, hi, a, b, n, axis):
        return a - lo, b - lo  # the core within the crop

    def run(self, x, rows, cols, context):
        return self.module(x)[..., rows[0] : rows[1], cols[0] : cols[1]]


class Norm(Op):
    """GroupNorm or InstanceNorm with the statistics of the whole tensor `source` (the
    stage's input), gathered while the previous stage wrote it."""

    def __init__(self, module: nn.Module, source: int):
        self.source = source
        self.groups = module.num_groups if isinstance(module, nn.GroupNorm) else None
        self.eps = module.eps
        self.weight = getattr(module, "weight", None)
        self.bias = getattr(module, "bias", None)

    def run(self, x, rows, cols, context):
        mean, var = context["stats"][self.source]["moments"].groups(self.groups or x.shape[1])
        return normalise(x, mean, var, self.eps, self.weight, self.bias)


def normalise(x, mean, var, eps, weight, bias) -> torch.Tensor:
    """x (B, C, H, W) normalised per group of channels with the given per-group mean and
    variance, then scaled and shifted per channel: one pass, x * a + b, in float32 (as
    GroupNorm under autocast)."""
    c = x.shape[1]
    scale = torch.rsqrt(var + eps).repeat_interleave(c // mean.numel())  # per channel
    shift = -mean.repeat_interleave(c // mean.numel()) * scale
    if weight is not None:
        scale, shift = scale * weight.float(), shift * weight.float() + bias.float()
    return torch.addcmul(shift.reshape(1, c, 1, 1), x.float(), scale.reshape(1, c, 1, 1))


@dataclass
class Add(Op):
    """The residual sum: the current tensor plus `ops` (a shortcut: a 1x1 convolution, a pixel
    (un)shuffle and channel averaging, or none) applied to the parked tensor `source`."""

    source: int
    ops: list[Op] = field(default_factory=list)


# -- moments ---------------------------------------------------------------------------------


class Moments:
    """Per-channel count, mean and sum of squared deviations of a whole tensor, merged from
    its tiles' cores (Chan et al.'s parallel update, in float64). A reducer: `add` takes a
    batch of whole cores (every pixel of the tensor once, over all calls); other reducers
    (`t.gather`) do the same."""

    def __init__(self):
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Merge in every pixel of x (B, C, H, W)."""
        b, c, h, w = x.shape
        n = h * w
        # per item and channel, over the tensor's own layout (no copy), then merged
        if not x.is_contiguous() and x.is_contiguous(memory_format=LAST):
            var, mean = torch.var_mean(x.permute(0, 2, 3, 1).reshape(b, n, c), dim=1, correction=0)
        else:
            var, mean = torch.var_mean(x.reshape(b, c, n), dim=2, correction=0)
        for item_mean, item_var in zip(mean.double(), var.double(), strict=True):
            self._merge(n, item_mean, item_var * n)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def groups(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group mean and (biased) variance as float32, channels grouped as GroupNorm
        groups them (consecutive)."""
        mean = self.mean.reshape(groups, -1)
        var = self.m2.reshape(groups, -1) / self.count
        # every channel holds the same count: the group's moments are the channels' average
        group_mean = mean.mean(dim=1)
        group_var = (var + (mean - group_mean[:, None]).square()).mean(dim=1)
        return group_mean.float(), group_var.float()

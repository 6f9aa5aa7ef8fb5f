"""The building blocks that block specs (aecli.config) turn into.

Each block is a small nn.Module that receives its parts; shapes are inferred by the builder.
Everything about a block lives with it: its forward, its FLOPs (`flops`), how exact tiling runs
it (`halo`, `path()` and `shortcut`, or `tile(t)`: see aecli.tiling.exact) and its tensors'
names in the layouts of released VAEs (`NAMES`). Each diffusion-VAE family's own blocks are in
a module of their own (aecli.models.dc, .wan, .hunyuan).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str) -> nn.Module:
    if name == "none":
        return nn.Identity()
    return {
        "relu": nn.ReLU,
        "silu": nn.SiLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.2),
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "elu": nn.ELU,
    }[name]()


def norm(kind: str, channels: int, groups: int = 32) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if channels % groups:
        raise ValueError(
            f"GroupNorm with {groups} groups needs channels divisible by it, got {channels}"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBlock(nn.Module):
    """Conv2d -> norm -> activation; `same` padding is TensorFlow's (extra pixel after)."""

    def __init__(self, conv: nn.Conv2d, norm_layer: nn.Module, act: nn.Module, tf_same: bool):
        super().__init__()
        self.conv, self.norm, self.act = conv, norm_layer, act
        self.tf_same = tf_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            k, s = self.conv.kernel_size[0], self.conv.stride[0]
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return self.act(self.norm(self.conv(x)))


class ConvTransposeBlock(nn.Module):
    """ConvTranspose2d -> crop -> norm -> activation. Keras 'same' crops (k - s) pixels,
    the extra one at the end, so that the output is exactly input * stride."""

    def __init__(self, conv: nn.ConvTranspose2d, crop: tuple[int, int], norm_layer, act):
        super().__init__()
        self.conv, self.norm, self.act = conv, norm_layer, act
        self.crop = crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if any(self.crop):
            x = Crop.apply(x, *self.crop)
        return self.act(self.norm(x))


class Crop(torch.autograd.Function):
    """`x[..., b : h - a, b : w - a]`: a view forward, and backward one pad of the gradient in
    its own memory format. Slicing's backward zero-fills a contiguous tensor and copies into it
    once per sliced dimension: on the CPU's channels-last tensors that took twice as long (and
    on CUDA twice the kernels)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, before: int, after: int) -> torch.Tensor:
        ctx.pads = (before, after, before, after)
        return x[..., before : x.shape[-2] - after, before : x.shape[-1] - after]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return F.pad(grad, ctx.pads), None, None


class Residual(nn.Module):
    """A residual block: `shortcut(x)` plus x through the modules of `path()`, in order (no sum
    where `shortcut` is None: DC-AE's first and last resampling blocks). Its forward and its
    exact tiling (aecli.tiling.exact) both walk `path()`, so the block is written once."""

    shortcut: nn.Module | None

    def path(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for step in self.path():
            h = step(h)
        # the path first: the sum takes its memory format (channels-last where the model runs
        # so), not that of a shortcut that reshuffles channels (pixel (un)shuffle, repeats)
        return h if self.shortcut is None else h + self.shortcut(x)


class ResBlock(Residual):
    """Residual block of latent diffusion's autoencoder (Rombach et al. 2022, ResnetBlock):
    (GroupNorm, activation, 3x3 convolution) twice, plus the input (through a 1x1 convolution
    where the widths differ)."""

    # its tensors under aecli's, diffusers' and latent diffusion's names
    NAMES = (
        *((f"{n}.", f"{n}.", f"{n}.") for n in ("norm1", "conv1", "norm2", "conv2")),
        ("shortcut.", "conv_shortcut.", "nin_shortcut."),  # where the widths differ
    )

    def __init__(self, channels: int, out: int, groups: int, act: str, dropout: float):
        super().__init__()
        self.norm1 = norm("group", channels, groups)
        self.conv1 = nn.Conv2d(channels, out, 3, padding=1)
        self.norm2 = norm("group", out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1)
        self.act = activation(act)
        self.shortcut = nn.Conv2d(channels, out, 1) if channels != out else nn.Identity()

    def path(self) -> tuple[nn.Module, ...]:
        return (self.norm1, self.act, self.conv1, self.norm2, self.act, self.dropout, self.conv2)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        shortcut = 2 * channels * out * pixels if channels != out else 0
        return 2 * 9 * pixels * (channels * out + out * out) + shortcut


class TinyBlock(nn.Module):
    """TAESD's residual block (madebyollin/taesd, by Ollin Boer Bohan; diffusers'
    AutoencoderTinyBlock): three 3x3 convolutions with an activation between them, plus the
    input, then ReLU. No normalisation.

    Everything about the block is here: the forward; `halo`, its exact-tiling step (an output
    pixel depends on the input within three pixels and on nothing else, so a tile runs this
    forward on its core plus the halo and keeps the core); `flops`; and its key names, which
    are its own submodules' in every layout (aecli, diffusers, TAESD's files):
    `conv.0`, `conv.2`, `conv.4` and, where the widths differ, `skip` (weight only)."""

    halo = 3

    def __init__(self, channels: int, out: int, act: str):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, out, 3, padding=1),
            activation(act),
            nn.Conv2d(out, out, 3, padding=1),
            activation(act),
            nn.Conv2d(out, out, 3, padding=1),
        )
        self.skip = nn.Conv2d(channels, out, 1, bias=False) if channels != out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        skip = 2 * channels * out * pixels if channels != out else 0
        return 2 * 9 * pixels * (channels * out + 2 * out * out) + skip


class SoftClamp(nn.Module):
    """tanh(x / m) * m: bounds TAESD's latents to (-m, m) before its decoder. Pointwise (exact
    tiles: a halo of 0), no tensors, no FLOPs counted (as for activations)."""

    halo = 0

    def __init__(self, magnitude: float):
        super().__init__()
        self.magnitude = magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.magnitude) * self.magnitude


class Attention(nn.Module):
    """Single-head self-attention over all positions, as in latent diffusion's AttnBlock.
    Exact tiling runs it over the whole tensor (aecli.tiling.exact)."""

    # its tensors under aecli's, diffusers' and latent diffusion's names (diffusers stores the
    # projections as (C, C) matrices)
    NAMES = (
        ("norm.", "group_norm.", "norm."),
        ("q.", "to_q.", "q."),
        ("k.", "to_k.", "k."),
        ("v.", "to_v.", "v."),
        ("proj.", "to_out.0.", "proj_out."),
    )
    # HunyuanImage 2.1's layout names the same block's tensors its own way (1x1 convolutions:
    # diffusers' norm, to_q ... proj; the release's norm, q ... proj_out)
    HUNYUAN_NAMES = (
        ("norm.", "norm.", "norm."),
        ("q.", "to_q.", "q."),
        ("k.", "to_k.", "k."),
        ("v.", "to_v.", "v."),
        ("proj.", "proj.", "proj_out."),
    )

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm("group", channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.norm(x))

    @staticmethod
    def flops(channels: int, positions: int) -> int:
        # q, k, v and the projection (1x1 convolutions), then q.k^T and its product with v
        return 4 * 2 * channels * channels * positions + 2 * 2 * positions * positions * channels

    def attend(self, y: torch.Tensor) -> torch.Tensor:
        """The residual branch, from the normalised input."""
        b, c, h, w = y.shape
        # (B, C, H, W) -> (B, 1, H*W, C): one head over every position
        q, k, v = (t(y).reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, factor: int, mode: str):
        super().__init__()
        self.factor, self.mode = factor, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode=self.mode)


class Resize(nn.Module):
    def __init__(self, size: tuple[int, int], mode: str):
        super().__init__()
        self.size, self.mode = size, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {} if self.mode == "nearest" else {"align_corners": False}
        return F.interpolate(x, size=self.size, mode=self.mode, **kwargs)


class LinearBlock(nn.Module):
    def __init__(self, linear: nn.Linear, act: nn.Module):
        super().__init__()
        self.linear, self.act = linear, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

"""HunyuanImage 2.1's VAE blocks (diffusers' autoencoder_kl_hunyuanimage.py), beside aecli's own.

The VAE is latent diffusion's autoencoder (its residual blocks and mid-block attention are
aecli's `blocks.ResBlock` and `blocks.Attention`: GroupNorm of 32 groups, eps 1e-6) with
residual shortcuts that move pixels between space and channels instead of learning them: the
downsampling adds the input's 2x2 space-to-channel averaged over groups of channels, the
upsampling the input's channels repeated and moved back to space; the encoder's output adds
its input averaged over groups of channels, the decoder's input convolution the latent's
channels repeated. Each shortcut is local, so each block tiles exactly as a `blocks.Residual`
(forward and tiling both walk `path()`, then add `shortcut`).

diffusers orders the channels of its 2x2 space-to-channel position-major, (row, column,
channel), where `F.pixel_unshuffle` is channel-major (channel, row, column): `SpaceToChannel`
and `ChannelToSpace` move each value once in diffusers' order (forward), and exact tiles
reorder around PyTorch's (un)shuffle.

Each block's tensor names (`NAMES`: aecli suffix, diffusers suffix, suffix in the released
checkpoint) follow it; the layout (aecli.io.vae_hunyuan) gives the prefixes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aecli.models import blocks, tile_ops

GROUPS = 32  # every GroupNorm of HunyuanImage's VAE

# the residual block's and the mid-block attention's tensors (aecli suffix, diffusers suffix,
# the released checkpoint's suffix): diffusers keeps the attention's projections as 1x1
# convolutions, named to_q ... proj, the release q ... proj_out
RESBLOCK_NAMES = blocks.ResBlock.NAMES[:-1]  # no learned shortcut: widths never change there
ATTENTION_NAMES = blocks.Attention.HUNYUAN_NAMES


def _position_major(u: torch.Tensor) -> torch.Tensor:
    """(B, 4C, H, W) in pixel_unshuffle's (channel, row, column) order -> diffusers' (row,
    column, channel) order."""
    b, c4, h, w = u.shape
    return u.unflatten(1, (c4 // 4, 4)).transpose(1, 2).reshape(b, c4, h, w)


def _channel_major(u: torch.Tensor) -> torch.Tensor:
    """The inverse of `_position_major`: diffusers' order -> pixel_shuffle's."""
    b, c4, h, w = u.shape
    return u.unflatten(1, (4, c4 // 4)).transpose(1, 2).reshape(b, c4, h, w)


def _pixels_last(x: torch.Tensor) -> bool:
    """Whether `x` (B, C, H, W) lies in memory as (B, H, W, C), channels-last, and not also as
    itself: then its (B, H, W, C) permutation is a view."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class SpaceToChannel(nn.Module):
    """2x2 space-to-channel (B, C, H, W) -> (B, 4C / group, H/2, W/2), in diffusers' channel
    order, each output channel the mean of `group` consecutive ones. Forward moves each value
    once, in the layout the input has (channels-last out of channels-last, averaged first
    where the groups lie within a pixel's channels); exact tiles: a pixel unshuffle, then a
    per-pixel reordering and mean."""

    def __init__(self, group: int = 1):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.group
        if c % g:  # groups across pixel positions: in diffusers' order first
            return self.regroup(F.pixel_unshuffle(x, 2))
        if _pixels_last(x):  # (B, H/2, 2, W/2, 2, C) -> (B, H/2, W/2, 2, 2, C)
            y = x.permute(0, 2, 3, 1).unflatten(2, (w // 2, 2)).unflatten(1, (h // 2, 2))
            y = y.unflatten(-1, (c // g, g)).mean(-1) if g > 1 else y
            y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, -1)
            return y.permute(0, 3, 1, 2)
        # (B, C, H/2, 2, W/2, 2) -> (B, 2, 2, C, H/2, W/2)
        y = x.unflatten(3, (w // 2, 2)).unflatten(2, (h // 2, 2))
        y = y.unflatten(1, (c // g, g)).mean(2) if g > 1 else y
        return y.permute(0, 3, 5, 1, 2, 4).reshape(b, -1, h // 2, w // 2)

    def regroup(self, u: torch.Tensor) -> torch.Tensor:
        u = _position_major(u)
        return u if self.group == 1 else u.unflatten(1, (-1, self.group)).mean(2)

    def tile(self, t) -> None:
        t.local(tile_ops.PixelUnshuffle(2))
        t.local(tile_ops.Pointwise(self.regroup))


class ChannelToSpace(nn.Module):
    """2x2 channel-to-space (B, C, H, W) -> (B, C x repeats / 4, 2H, 2W) from diffusers'
    channel order, each input channel first repeated `repeats` times. Forward moves each value
    once after the repeat, in the layout the input has; exact tiles: a per-pixel repeat and
    reordering, then a pixel shuffle."""

    def __init__(self, repeats: int = 1):
        super().__init__()
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeats > 1:
            x = x.repeat_interleave(self.repeats, dim=1)
        b, c, h, w = x.shape
        if _pixels_last(x):  # (B, H, W, 2, 2, C/4) -> (B, H, 2, W, 2, C/4)
            y = x.permute(0, 2, 3, 1).unflatten(-1, (2, 2, c // 4))
            y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)
            return y.permute(0, 3, 1, 2)
        # (B, 2, 2, C/4, H, W) -> (B, C/4, H, 2, W, 2)
        y = x.unflatten(1, (2, 2, c // 4)).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(b, c // 4, 2 * h, 2 * w)

    def order(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeats > 1:
            x = x.repeat_interleave(self.repeats, dim=1)
        return _channel_major(x)

    def tile(self, t) -> None:
        t.local(tile_ops.Pointwise(self.order))
        t.local(tile_ops.PixelShuffle(2))


class ChannelMean(nn.Module):
    """(B, C, H, W) -> (B, C / group, H, W): the mean of each `group` consecutive channels.
    Pointwise (exact tiles: a halo of 0)."""

    halo = 0

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.group == 1 else x.unflatten(1, (-1, self.group)).mean(2)


class RepeatChannels(nn.Module):
    """(B, C, H, W) -> (B, C x repeats, H, W), each channel `repeats` times in a row.
    Pointwise (exact tiles: a halo of 0)."""

    halo = 0

    def __init__(self, repeats: int):
        super().__init__()
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.repeats == 1 else x.repeat_interleave(self.repeats, dim=1)


class Downsample(blocks.Residual):
    """diffusers' HunyuanImageDownsample: a 3x3 convolution to out / 4 channels, then 2x2
    space-to-channel; plus the input's 2x2 space-to-channel averaged over 4 x channels / out
    consecutive channels."""

    NAMES = (("conv.", "conv.", "conv."),)

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out // 4, 3, padding=1)
        self.unshuffle = SpaceToChannel()
        self.shortcut = SpaceToChannel(4 * channels // out)

    def path(self) -> tuple[nn.Module, ...]:
        return (self.conv, self.unshuffle)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        """`pixels`: the output's; the convolution runs on 4 times as many."""
        return 2 * 9 * channels * (out // 4) * 4 * pixels


class Upsample(blocks.Residual):
    """diffusers' HunyuanImageUpsample: a 3x3 convolution to 4 x out channels, then 2x2
    channel-to-space; plus the input's channels, each repeated 4 x out / channels times, moved
    to space the same way."""

    NAMES = (("conv.", "conv.", "conv."),)

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * out, 3, padding=1)
        self.shuffle = ChannelToSpace()
        self.shortcut = ChannelToSpace(4 * out // channels)

    def path(self) -> tuple[nn.Module, ...]:
        return (self.conv, self.shuffle)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        """`pixels`: the output's; the convolution runs on a quarter as many."""
        return 2 * 9 * channels * 4 * out * (pixels // 4)


class DecoderIn(blocks.Residual):
    """The decoder's input (HunyuanImageDecoder2D: conv_in and its shortcut): a 3x3 convolution
    from the latent, plus the latent's channels each repeated out / channels times."""

    NAMES = (("conv.", "", ""),)  # decoder.conv_in itself

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out, 3, padding=1)
        self.shortcut = RepeatChannels(out // channels)

    def path(self) -> tuple[nn.Module, ...]:
        return (self.conv,)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        return 2 * 9 * channels * out * pixels


class EncoderOut(blocks.Residual):
    """The encoder's output (HunyuanImageEncoder2D: norm_out, SiLU, conv_out and its
    shortcut): GroupNorm, SiLU and a 3x3 convolution to the latent's mean and log-variance,
    plus the input averaged over groups of channels / out consecutive channels."""

    NAMES = (("norm.", "norm_out.", "norm_out."), ("conv.", "conv_out.", "conv_out."))

    def __init__(self, channels: int, out: int, groups: int):
        super().__init__()
        self.norm = blocks.norm("group", channels, groups)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(channels, out, 3, padding=1)
        self.shortcut = ChannelMean(channels // out)

    def path(self) -> tuple[nn.Module, ...]:
        return (self.norm, self.act, self.conv)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        return 2 * 9 * channels * out * pixels


# -- shapes, for the block registry: ValueError for what diffusers cannot run either ----------


def down_shape(channels: int, out: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if out % 4 or (4 * channels) % out:
        raise ValueError(
            f"hunyuan_down to {out} channels from {channels}: out must be a multiple of 4 that "
            "divides 4x the input's channels"
        )
    _even(shape, "hunyuan_down")
    return (out, shape[1] // 2, shape[2] // 2)


def up_shape(channels: int, out: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if (4 * out) % channels:
        raise ValueError(
            f"hunyuan_up to {out} channels from {channels}: 4x out must be a multiple of the "
            "input's channels"
        )
    return (out, shape[1] * 2, shape[2] * 2)


def in_shape(channels: int, out: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if out % channels:
        raise ValueError(
            f"hunyuan_in to {out} channels from {channels}: out must be a multiple of them"
        )
    return (out, *shape[1:])


def out_shape(channels: int, out: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if channels % out:
        raise ValueError(f"hunyuan_out to {out} channels from {channels}: out must divide them")
    return (out, *shape[1:])


def _even(shape: tuple[int, ...], what: str) -> None:
    if shape[1] % 2 or shape[2] % 2:
        raise ValueError(f"{what} needs an even height and width, got {shape[1]}x{shape[2]}")

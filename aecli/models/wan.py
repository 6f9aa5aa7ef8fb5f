"""The Wan / Qwen-Image VAE's blocks (diffusers' autoencoder_kl_wan.py and
autoencoder_kl_qwenimage.py) for images: a video VAE run on one frame, T = 1.

diffusers runs the VAE on (B, C, T, H, W) with a feature cache, and an image is a video of one
frame: its first (and only) chunk. What that frame sees is all these blocks compute, on
(B, C, H, W):

- a causal 3-D convolution pads time with 2 zero frames before the frame (no cache on the
  first chunk), so only the kernel's last time slice meets the frame: it is the 2-D
  convolution of that slice (`CausalConv`);
- the resamplings' time convolutions never run on the first chunk (the cache is empty, or
  `Rep`): kept, not run (`TimeConv`);
- Wan 2.2's shortcuts: `AvgDown3D` pads the single frame with a zero frame before it where it
  halves time, and averages those zeros in (`AvgDown`); `DupUp3D` keeps the last of the frames
  it makes on the first chunk (`DupUp`);
- the RMS norm normalises each pixel's channel vector (`RMSNorm`), and the attention is
  softmax attention over the frame's pixels (`Attention`).

Every tensor keeps its real shape in `state_dict` (a causal convolution's weight is
(O, I, 3, 3, 3)), so that a file read and written back is equal and each name maps 1:1 with
equal shapes. The module holds a 5-D tensor flattened to 3-D, (O, I, 3 x 3 x 3): PyTorch's
`Module.to(memory_format=torch.channels_last)` refuses 5-D tensors and would copy a 4-D one
whole (1.3 s of Wan 2.2's 2.7 GB on the dev CPU) though a frame meets only a third of it;
`_stored_as` reshapes them on the way out and in. Fine-tuning trains what a single frame uses
(the convolutions' last time slices; the other slices get zero gradients, and the time
convolutions are buffers).

Each block's forward, FLOPs, exact-tiling step (`blocks.Residual`'s path and shortcut, or
`tile(t)`) and its tensors' names (`tensor_names`: diffusers' suffix and the original Wan
file's, for an aecli suffix) are here, and its output shape where it changes; the layouts
(aecli.io.vae_wan) give the prefixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aecli.models import blocks, tile_ops


def _stored_as(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """`state_dict` gives, and `load_state_dict` takes, the tensors `shapes` names in those
    (5-D) shapes; the module holds them reshaped to 3-D."""

    def give(_module, state, prefix, _metadata):
        for name, shape in shapes.items():
            if prefix + name in state:
                state[prefix + name] = state[prefix + name].reshape(shape)

    def take(own, state, prefix, *_):
        for name, shape in shapes.items():
            key = prefix + name
            if key in state and tuple(state[key].shape) == shape:
                state[key] = state[key].reshape(getattr(own, name).shape)

    module.register_state_dict_post_hook(give)
    module.register_load_state_dict_pre_hook(take)


def _uniform(tensor: torch.Tensor, fan_in: int) -> None:
    """nn.Conv3d's initialisation (kaiming_uniform with a = sqrt(5), and its bias)."""
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(tensor, -bound, bound)


def _same_names(rest: str) -> tuple[str, str]:
    return rest, rest


class CausalConv(nn.Module):
    """WanCausalConv3d with a cubic kernel (1 or 3) on a single frame: the 2-D convolution of
    its kernel's last time slice, zero padding kernel // 2 in space. Its tensors are
    `weight` (O, I, k, k, k) and `bias` under every layout's name for the module."""

    def __init__(self, channels: int, out: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        # (O, I, k, k, k) held as (O, I, k * k * k): the last time slice is the last k * k
        self.weight = nn.Parameter(torch.empty(out, channels, kernel**3))
        self.bias = nn.Parameter(torch.empty(out))
        _uniform(self.weight, channels * kernel**3)
        _uniform(self.bias, channels * kernel**3)
        _stored_as(self, {"weight": (out, channels, kernel, kernel, kernel)})

    def frame_weight(self) -> torch.Tensor:
        """The kernel's last time slice, (O, I, k, k): all a single frame meets."""
        k = self.kernel
        return self.weight[:, :, -k * k :].unflatten(2, (k, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.frame_weight(), self.bias, padding=self.kernel // 2)

    def tile(self, t) -> None:
        t.local(tile_ops.Conv.of(self.frame_weight(), self.bias, 1, self.kernel // 2))

    tensor_names = staticmethod(_same_names)

    @staticmethod
    def flops(channels: int, out: int, kernel: int, pixels: int) -> int:
        return 2 * channels * out * kernel * kernel * pixels


class TimeConv(nn.Module):
    """A resampling's causal time convolution, (O, I, 3, 1, 1) and its bias: never run on a
    single frame (diffusers' first chunk skips it), kept so that the weights written back are
    the weights read. Buffers, not parameters: nothing trains them, and data-parallel training
    would take an unused parameter for an error."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(out, channels, 3))  # (O, I, 3, 1, 1)
        self.register_buffer("bias", torch.empty(out))
        _uniform(self.weight, channels * 3)
        _uniform(self.bias, channels * 3)
        _stored_as(self, {"weight": (out, channels, 3, 1, 1)})


class RMSNorm(nn.Module):
    """WanRMS_norm: each pixel's channel vector scaled to unit length, times sqrt(C) and a
    learned `gamma` (C, 1, 1, 1) (`images`: (C, 1, 1), as in the attention), normalised in
    float32 where the input is half precision. Per pixel, but exact tiles begin a stage at it,
    as at a GroupNorm: a stage then holds one convolution's context, not the residual block's
    two (at the f16 latent of Wan 2.2, 48 image pixels across instead of 80)."""

    def __init__(self, channels: int, images: bool = False):
        super().__init__()
        shape = (channels, 1, 1) if images else (channels, 1, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.scale = channels**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        normalised = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
        return normalised * self.scale * self.gamma.view(-1, 1, 1)

    def tile(self, t) -> None:
        t.park()
        t.local(tile_ops.Pointwise(self))

    tensor_names = staticmethod(_same_names)


class ResBlock(blocks.Residual):
    """WanResidualBlock: (RMS norm, SiLU, causal 3x3x3 convolution) twice, with dropout before
    the second convolution, plus the input (through a causal 1x1x1 convolution where the
    widths differ)."""

    # aecli's submodule -> (diffusers', the original Wan file's)
    RENAMED = {
        "norm1.": ("norm1.", "residual.0."),
        "conv1.": ("conv1.", "residual.2."),
        "norm2.": ("norm2.", "residual.3."),
        "conv2.": ("conv2.", "residual.6."),
        "shortcut.": ("conv_shortcut.", "shortcut."),
    }

    def __init__(self, channels: int, out: int, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(channels)
        self.conv1 = CausalConv(channels, out, 3)
        self.norm2 = RMSNorm(out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv(out, out, 3)
        self.act = nn.SiLU()
        self.shortcut = CausalConv(channels, out, 1) if channels != out else nn.Identity()

    def path(self) -> tuple[nn.Module, ...]:
        return (self.norm1, self.act, self.conv1, self.norm2, self.act, self.dropout, self.conv2)

    @classmethod
    def tensor_names(cls, rest: str) -> tuple[str, str]:
        for aecli, (diffusers, original) in cls.RENAMED.items():
            if rest.startswith(aecli):
                return diffusers + rest[len(aecli) :], original + rest[len(aecli) :]
        raise KeyError(rest)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        shortcut = 2 * channels * out * pixels if channels != out else 0
        return 2 * 9 * pixels * (channels * out + out * out) + shortcut


class Attention(nn.Module):
    """WanAttentionBlock on one frame: RMS norm, one 1x1 convolution to queries, keys and
    values (in that order along its outputs), single-head softmax attention over the frame's
    pixels, a 1x1 projection, plus the input. Exact tiles run it on the whole tensor (it sits
    at the latent's resolution)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, images=True)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 3C, H, W) -> (B, 1, H*W, 3C): one head over every pixel
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, 3 * c, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))

    def tile(self, t) -> None:
        t.whole(self)

    tensor_names = staticmethod(_same_names)
    flops = staticmethod(blocks.Attention.flops)


class Downsample(nn.Module):
    """WanResample downsample2d / downsample3d: one zero pixel after each axis, then a 3x3
    convolution of stride 2; downsample3d's time convolution is kept (`TimeConv`)."""

    def __init__(self, channels: int, time: bool):
        super().__init__()
        self.resample = nn.Sequential(
            nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2)
        )
        self.time_conv = TimeConv(channels, channels) if time else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)

    def tile(self, t) -> None:
        conv = self.resample[1]
        t.local(tile_ops.Conv.of(conv.weight, conv.bias, 2, ((0, 1), (0, 1))))

    tensor_names = staticmethod(_same_names)

    @staticmethod
    def flops(channels: int, pixels: int) -> int:
        return 2 * 9 * channels * channels * pixels  # `pixels`: the output's


class Upsample(nn.Module):
    """WanResample upsample2d / upsample3d: nearest 2x upsampling (diffusers' nearest-exact is
    nearest at a factor of 2), then a 3x3 convolution to `out` channels; upsample3d's time
    convolution (to twice the channels) is kept (`TimeConv`)."""

    def __init__(self, channels: int, out: int, time: bool):
        super().__init__()
        self.resample = nn.Sequential(
            blocks.Upsample(2, "nearest"), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.time_conv = TimeConv(channels, 2 * channels) if time else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)

    def tile(self, t) -> None:
        t.module(self.resample)  # blocks.Upsample and nn.Conv2d tile as they are

    tensor_names = staticmethod(_same_names)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        return 2 * 9 * channels * out * pixels  # `pixels`: the output's


class AvgDown(nn.Module):
    """AvgDown3D on a single frame: `space` x `space` patches of pixels to channels
    (F.pixel_unshuffle's order is AvgDown3D's), with a zero frame before the frame where
    time is halved too (`time` 2: the causal padding it makes), then the mean of each group
    of consecutive channels down to `out`. No tensors; exact tiles: a pixel unshuffle and a
    per-pixel mean."""

    def __init__(self, channels: int, out: int, time: int, space: int):
        super().__init__()
        factor = time * space * space
        if channels * factor % out:
            raise ValueError(
                f"a shortcut from {channels} to {out} channels needs {out} to divide "
                f"{channels} x {factor}"
            )
        self.out, self.time, self.space = out, time, space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.space > 1:
            x = F.pixel_unshuffle(x, self.space)
        return self.average(x)

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C s^2, h, w) -> (B, out, h, w), s^2 the space factor's square."""
        b, c, h, w = x.shape
        if self.time > 1:
            # (B, C, 1, s^2, h, w) after the zero frame(s): (B, C, t, s^2, h, w)
            x = x.reshape(b, c // self.space**2, 1, self.space**2, h, w)
            zeros = x.new_zeros(b, x.shape[1], self.time - 1, self.space**2, h, w)
            x = torch.cat([zeros, x], dim=2).reshape(b, c * self.time, h, w)
        return x.reshape(b, self.out, -1, h, w).mean(dim=2)

    def tile(self, t) -> None:
        if self.space > 1:
            t.local(tile_ops.PixelUnshuffle(self.space))
        t.local(tile_ops.Pointwise(self.average))


class DupUp(nn.Module):
    """DupUp3D on a single frame, first chunk: the channels repeated up to out x `time` x
    `space`^2, and of the `time` frames they make the last kept, its `space` x `space`
    patches moved to pixels. No tensors; exact tiles: a per-pixel selection and a pixel
    shuffle."""

    def __init__(self, channels: int, out: int, time: int, space: int):
        super().__init__()
        factor = time * space * space
        if out * factor % channels:
            raise ValueError(
                f"a shortcut from {channels} to {out} channels needs {channels} to divide "
                f"{out} x {factor}"
            )
        self.out, self.time, self.space = out, time, space
        self.repeats = out * factor // channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.select(x), self.space)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, out s^2, h, w): the last frame's channels, pixel_shuffle's
        order (DupUp3D's)."""
        b, _, h, w = x.shape
        s2 = self.space**2
        x = x.repeat_interleave(self.repeats, dim=1).reshape(b, self.out, self.time, s2, h, w)
        return x[:, :, -1].reshape(b, self.out * s2, h, w)

    def tile(self, t) -> None:
        t.local(tile_ops.Pointwise(self.select))
        if self.space > 1:
            t.local(tile_ops.PixelShuffle(self.space))


class DownBlock(blocks.Residual):
    """Wan 2.2's WanResidualDownBlock: residual blocks and a downsampling (none at the last
    level), plus the input through `AvgDown`."""

    def __init__(self, channels: int, out: int, count: int, down: bool, time: bool, dropout: float):
        super().__init__()
        self.shortcut = AvgDown(channels, out, 2 if time else 1, 2 if down else 1)
        pairs = _widths(channels, out, count)
        self.resnets = nn.ModuleList(ResBlock(a, b, dropout) for a, b in pairs)
        self.downsampler = Downsample(out, time) if down else None

    def path(self) -> tuple[nn.Module, ...]:
        return (*self.resnets, *([self.downsampler] if self.downsampler is not None else []))

    def tensor_names(self, rest: str) -> tuple[str, str]:
        """The original file nests its residual blocks and downsampling as `downsamples.N`."""
        return _nested(rest, self.resnets, "downsampler", "downsamples")

    @staticmethod
    def flops(channels: int, out: int, count: int, down: bool, pixels: int) -> int:
        found = sum(ResBlock.flops(a, b, pixels) for a, b in _widths(channels, out, count))
        return found + (Downsample.flops(out, pixels // 4) if down else 0)


class UpBlock(blocks.Residual):
    """Wan 2.2's WanResidualUpBlock with its upsampling: residual blocks, then the
    upsampling, plus the input through `DupUp`."""

    def __init__(self, channels: int, out: int, count: int, time: bool, dropout: float):
        super().__init__()
        self.shortcut = DupUp(channels, out, 2 if time else 1, 2)
        pairs = _widths(channels, out, count)
        self.resnets = nn.ModuleList(ResBlock(a, b, dropout) for a, b in pairs)
        self.upsampler = Upsample(out, out, time)

    def path(self) -> tuple[nn.Module, ...]:
        return (*self.resnets, self.upsampler)

    def tensor_names(self, rest: str) -> tuple[str, str]:
        return _nested(rest, self.resnets, "upsampler", "upsamples")

    @staticmethod
    def flops(channels: int, out: int, count: int, pixels: int) -> int:
        found = sum(ResBlock.flops(a, b, pixels) for a, b in _widths(channels, out, count))
        return found + Upsample.flops(out, out, 4 * pixels)


def _widths(channels: int, out: int, count: int) -> list[tuple[int, int]]:
    """(input, output) channels of `count` residual blocks from `channels` to `out`."""
    return [(channels, out)] + [(out, out)] * (count - 1)


def _nested(rest: str, resnets: nn.ModuleList, resample: str, original: str) -> tuple[str, str]:
    """(diffusers', original) names of a tensor of a Wan 2.2 residual up or down block:
    diffusers' `resnets.J.` and `downsampler.` / `upsampler.`; the original file's
    `downsamples.J.` / `upsamples.J.`, the resampling after the residual blocks."""
    head, _, tail = rest.partition(".")
    if head == "resnets":
        index, _, inner = tail.partition(".")
        diffusers, theirs = ResBlock.tensor_names(inner)
        return f"resnets.{index}.{diffusers}", f"{original}.{index}.{theirs}"
    return rest, f"{original}.{len(resnets)}.{tail}"


class Patch(nn.Module):
    """Wan 2.2's patchify: each `patch` x `patch` square of pixels becomes channels, in
    diffusers' order (channel, column, row), where F.pixel_unshuffle's is (channel, row,
    column). A patch of 1 changes nothing (Wan 2.1, Qwen-Image)."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch == 1:
            return x
        return _columns_first(F.pixel_unshuffle(x, self.patch), self.patch)

    def reorder(self, x: torch.Tensor) -> torch.Tensor:
        return _columns_first(x, self.patch)

    def tile(self, t) -> None:
        if self.patch > 1:
            t.local(tile_ops.PixelUnshuffle(self.patch))
            t.local(tile_ops.Pointwise(self.reorder))


class Unpatch(nn.Module):
    """Wan 2.2's unpatchify, the inverse of `Patch`."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch == 1:
            return x
        return F.pixel_shuffle(_columns_first(x, self.patch), self.patch)

    def reorder(self, x: torch.Tensor) -> torch.Tensor:
        return _columns_first(x, self.patch)

    def tile(self, t) -> None:
        if self.patch > 1:
            t.local(tile_ops.Pointwise(self.reorder))
            t.local(tile_ops.PixelShuffle(self.patch))


def _columns_first(x: torch.Tensor, p: int) -> torch.Tensor:
    """Swap the row and column of each channel's p x p patch position: (c, row, column) <->
    (c, column, row); its own inverse."""
    b, c, h, w = x.shape
    return x.reshape(b, c // (p * p), p, p, h, w).transpose(2, 3).reshape(b, c, h, w)


def patched_shape(shape: tuple[int, ...], patch: int) -> tuple[int, ...]:
    """`Patch`'s output shape for an input of `shape` (C, H, W)."""
    if shape[1] % patch or shape[2] % patch:
        raise ValueError(f"{'x'.join(map(str, shape))} does not split into {patch}x{patch} patches")
    return (shape[0] * patch * patch, shape[1] // patch, shape[2] // patch)


def unpatched_shape(shape: tuple[int, ...], patch: int) -> tuple[int, ...]:
    """`Unpatch`'s output shape for an input of `shape` (C, H, W)."""
    if shape[0] % (patch * patch):
        raise ValueError(f"{shape[0]} channels do not make {patch}x{patch} patches")
    return (shape[0] // (patch * patch), shape[1] * patch, shape[2] * patch)


def resampled_shape(shape: tuple[int, ...], down: bool, out: int) -> tuple[int, ...]:
    """The output shape of a 2x resampling (`Downsample`: one pixel of padding after each
    axis, then a stride-2 3x3 convolution; `Upsample`) to `out` channels."""
    if down:
        return (out, *((n + 1 - 3) // 2 + 1 for n in shape[1:]))
    return (out, shape[1] * 2, shape[2] * 2)

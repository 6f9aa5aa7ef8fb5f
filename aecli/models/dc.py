"""DC-AE's blocks (Chen et al. 2024, "Deep Compression Autoencoder"; diffusers'
autoencoder_dc.py, mit-han-lab/efficientvit), beside aecli's own.

DC-AE has no GroupNorm: its norms are an RMS norm over the channels of each pixel
(`RMSNorm2d`) and, in some decoders, BatchNorm, both local. What is not local is the
EfficientViT block's multi-scale ReLU linear attention (`LinearAttention`): each output pixel
reads, per head, the sums over every position of [v; 1] relu(k)^T. Exact tiles gather those
sums over the whole tensor, as GroupNorm's moments are gathered (`AttentionSums`, `t.gather`),
and every other step (the q, k, v projections, the multi-scale depthwise convolutions, the
attention's output for each pixel, GLUMBConv) runs tile by tile. The down and up blocks add
shortcuts that move pixels between space and channels instead of learning them (a pixel
unshuffle and a mean over groups of channels; channels repeated and a pixel shuffle); the
encoder's output adds its input averaged over groups of channels, the decoder's input
convolution the latent's channels repeated. Each is local.

Each block also gives its tensors' names (`NAMES`, or `names()` where they depend on its
settings: `Names`, the aecli prefix, diffusers' and the prefix in DC-AE's original checkpoints
as diffusers' convert_autoencoder_dc_checkpoint_to_diffusers maps them); the layout
(aecli.io.vae_dc) gives where each block sits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aecli.models import blocks, tile_ops

EPS = 1e-5  # every RMS norm and BatchNorm of DC-AE
ATTENTION_EPS = 1e-15  # SanaMultiscaleLinearAttention's, added to the attention's denominator
EXPAND = 4  # GLUMBConv's hidden channels per input channel


class Names(NamedTuple):
    """Where a block's tensors are found: the aecli prefix, diffusers' and that of DC-AE's
    original checkpoint. `matrix`: diffusers holds the 1x1 convolution as an nn.Linear, its
    weight (O, I). Prefixes that share an original name are one tensor there, concatenated in
    order along the first dimension (the original's qkv, diffusers' to_q, to_k, to_v)."""

    aecli: str
    diffusers: str
    original: str
    matrix: bool = False


# -- pixel-by-pixel parts --------------------------------------------------------------------


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of each pixel, with a weight and a bias (diffusers' RMSNorm
    applied channels-last; efficientvit's TritonRMSNorm2d): x / sqrt(mean(x^2) + eps), in
    float32. Pointwise (exact tiles: a halo of 0); its names are its own (`weight`, `bias`)."""

    halo = 0

    def __init__(self, channels: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().movedim(1, -1)  # (B, H, W, C): a view of a channels-last tensor
        y = F.rms_norm(y, y.shape[-1:], self.weight.float(), self.eps) + self.bias.float()
        return y.movedim(-1, 1).to(x.dtype)


def norm(kind: str, channels: int) -> nn.Module:
    """The norm of a DC-AE block: `rms` (RMSNorm2d) or `batch` (BatchNorm2d, as the decoders of
    the in-1.0 and mix-1.0 releases have at their higher resolutions)."""
    return RMSNorm2d(channels) if kind == "rms" else nn.BatchNorm2d(channels, eps=EPS)


class Gate(nn.Module):
    """GLUMBConv's gate: the first half of the channels times SiLU of the second. Pointwise."""

    halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=1)
        return x * F.silu(gate)


class ChannelMean(nn.Module):
    """(B, C, H, W) -> (B, C / group, H, W): the mean of each `group` consecutive channels.
    Pointwise."""

    halo = 0

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.group == 1 else x.unflatten(1, (-1, self.group)).mean(dim=2)


class RepeatChannels(nn.Module):
    """(B, C, H, W) -> (B, C x repeats, H, W), each channel `repeats` times in a row.
    Pointwise."""

    halo = 0

    def __init__(self, repeats: int):
        super().__init__()
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.repeats == 1 else x.repeat_interleave(self.repeats, dim=1)


class PixelUnshuffle(nn.Module):
    """F.pixel_unshuffle by 2: (B, C, H, W) -> (B, 4C, H/2, W/2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, 2)

    def tile(self, t) -> None:
        t.local(tile_ops.PixelUnshuffle(2))


class PixelShuffle(nn.Module):
    """F.pixel_shuffle by 2: (B, 4C, H, W) -> (B, C, 2H, 2W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(x, 2)

    def tile(self, t) -> None:
        t.local(tile_ops.PixelShuffle(2))


class Block(blocks.Residual):
    """blocks.Residual whose shortcut is optional and set by the block (DC-AE's first and last
    resampling blocks have none)."""

    def __init__(self):
        super().__init__()
        self.shortcut: nn.Module | None = None  # set (a module) by blocks that have one


# -- the residual blocks ---------------------------------------------------------------------


class ResBlock(Block):
    """DC-AE's residual block: a 3x3 convolution, an activation, a 3x3 convolution without
    bias and a norm (RMS or BatchNorm), plus the input."""

    NAMES = (
        Names("conv1.", "conv1.", "main.conv1.conv."),
        Names("conv2.", "conv2.", "main.conv2.conv."),
        Names("norm.", "norm.", "main.conv2.norm."),
    )

    def __init__(self, channels: int, norm_kind: str, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = blocks.activation(act)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = norm(norm_kind, channels)
        self.shortcut = nn.Identity()

    def path(self) -> tuple[nn.Module, ...]:
        return (self.conv1, self.act, self.conv2, self.norm)

    @staticmethod
    def flops(channels: int, pixels: int) -> int:
        return 2 * 2 * 9 * channels * channels * pixels


class GLUMBConv(Block):
    """The EfficientViT block's feed-forward part (diffusers' GLUMBConv): a 1x1 convolution to
    2 x 4 x the channels, SiLU, a 3x3 depthwise convolution, the gate (half the channels times
    SiLU of the other half), a 1x1 convolution back without bias and an RMS norm, plus the
    input."""

    NAMES = (
        Names("conv_inverted.", "conv_inverted.", "main.inverted_conv.conv."),
        Names("conv_depth.", "conv_depth.", "main.depth_conv.conv."),
        Names("conv_point.", "conv_point.", "main.point_conv.conv."),
        Names("norm.", "norm.", "main.point_conv.norm."),
    )

    def __init__(self, channels: int):
        super().__init__()
        hidden = EXPAND * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.act = nn.SiLU()
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.gate = Gate()
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)
        self.shortcut = nn.Identity()

    def path(self) -> tuple[nn.Module, ...]:
        return (
            self.conv_inverted,
            self.act,
            self.conv_depth,
            self.gate,
            self.conv_point,
            self.norm,
        )

    @staticmethod
    def flops(channels: int, pixels: int) -> int:
        hidden = EXPAND * channels
        inverted = 2 * channels * 2 * hidden
        return pixels * (inverted + 2 * 9 * 2 * hidden + 2 * hidden * channels)


# -- linear attention ------------------------------------------------------------------------


class MultiScale(nn.Module):
    """One scale of the multi-scale q, k, v (diffusers' SanaMultiscaleAttentionProjection): a
    k x k depthwise convolution, then a 1x1 convolution within each head's channels, both
    without bias."""

    def __init__(self, channels: int, heads: int, kernel: int):
        super().__init__()
        self.proj_in = nn.Conv2d(
            channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False
        )
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


def split_qkv(h: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
    """The multi-scale q, k, v (B, 3 d G, H, W) as relu(q), relu(k), v, each (B, G, d, H W) in
    float32 (as diffusers computes linear attention): G groups of 3 d consecutive channels,
    each split in three."""
    b, _, height, width = h.shape
    q, k, v = h.float().reshape(b, -1, 3 * head_dim, height * width).chunk(3, dim=2)
    return F.relu(q), F.relu(k), v


def attention_sums(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, G, d + 1, d): per group, the sum over every position of [v; 1] relu(k)^T."""
    return F.pad(v, (0, 0, 0, 1), value=1.0) @ k.transpose(-1, -2)


def attend(q: torch.Tensor, sums: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Each position's attention output (B, G d, H, W) from its relu(q) and the `sums`: the
    sums' first d rows times relu(q), over their last row's (+ eps)."""
    out = sums.to(q.dtype) @ q  # (B, G, d + 1, H W)
    out = out[:, :, :-1] / (out[:, :, -1:] + ATTENTION_EPS)
    return out.reshape(shape[0], -1, *shape[2:])


class AttentionSums:
    """The reducer exact tiles gather a linear attention's sums with: `add` takes batches of
    whole cores of the multi-scale q, k, v of one image (every position once, over all calls),
    `total` is their sum (1, G, d + 1, d), in float64."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.total: torch.Tensor | None = None

    def add(self, h: torch.Tensor) -> None:
        _, k, v = split_qkv(h, self.head_dim)
        found = attention_sums(k, v).sum(dim=0, keepdim=True).double()
        self.total = found if self.total is None else self.total + found

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """The attention's output for the pixels of `h` (a crop of the whole tensor)."""
        q, _, _ = split_qkv(h, self.head_dim)
        return attend(q, self.total, h.shape).to(h.dtype)


class LinearAttention(nn.Module):
    """DC-AE's multi-scale ReLU linear attention (Cai et al. 2023, EfficientViT; diffusers'
    SanaMultiscaleLinearAttention with its residual): q, k and v by 1x1 convolutions, then at
    each kernel size of `scales` a depthwise convolution and a 1x1 convolution within each
    head's channels of them, all concatenated; per group of head_dim channels of each,
    relu(q) attends to every position through relu(k)^T v, normalised by relu(k)'s sum
    (diffusers' SanaMultiscaleAttnProcessor2_0, in float32); a 1x1 convolution without bias,
    a norm (RMS or BatchNorm), plus the input. (For latents of at most head_dim positions
    diffusers takes a quadratic path that is the same sum in another order.)

    Exact tiles: the projections and the multi-scale convolutions run tile by tile and their
    whole output is parked, gathering the sums of [v; 1] relu(k)^T over all of it
    (`AttentionSums`); each pixel's output then comes from its own q and those sums."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], norm_kind: str):
        super().__init__()
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = nn.Conv2d(channels, inner, 1, bias=False)
        self.to_k = nn.Conv2d(channels, inner, 1, bias=False)
        self.to_v = nn.Conv2d(channels, inner, 1, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(
            MultiScale(3 * inner, 3 * heads, kernel) for kernel in scales
        )
        self.to_out = nn.Conv2d(inner * (1 + len(scales)), channels, 1, bias=False)
        self.norm_out = norm(norm_kind, channels)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 3 inner (1 + scales), H, W): q, k, v, then each scale's."""
        h = F.conv2d(x, self._qkv_weight())
        return torch.cat([h, *(scale(h) for scale in self.to_qkv_multiscale)], dim=1)

    def _qkv_weight(self) -> torch.Tensor:
        return torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.qkv(x)
        q, k, v = split_qkv(h, self.head_dim)
        out = attend(q, attention_sums(k, v), h.shape).to(h.dtype)
        return self.norm_out(self.to_out(out)) + x  # in the convolutions' memory format

    def tile(self, t) -> None:
        skip = t.park()
        t.local(tile_ops.Conv.of(self._qkv_weight(), None))
        if len(self.to_qkv_multiscale):
            t.local(MultiScaleOp(self))
        source = t.gather("linear_attention", functools.partial(AttentionSums, self.head_dim))
        t.local(tile_ops.Uses(lambda h, sums: sums.attend(h), source, "linear_attention"))
        t.local(tile_ops.Conv.of(self.to_out.weight, None))
        t.module(self.norm_out)
        t.add(skip)

    @staticmethod
    def flops(channels: int, head_dim: int, scales: tuple[int, ...], pixels: int) -> int:
        inner = channels // head_dim * head_dim
        groups = inner // head_dim * (1 + len(scales))
        projections = 3 * 2 * channels * inner
        multiscale = sum(2 * 3 * inner * (k * k + head_dim) for k in scales)
        # [v; 1] relu(k)^T, then its product with relu(q): (d + 1) x d x positions each
        attention = groups * 2 * 2 * (head_dim + 1) * head_dim
        out = 2 * inner * (1 + len(scales)) * channels
        return pixels * (projections + multiscale + attention + out)


class MultiScaleOp(tile_ops.Op):
    """The q, k, v tensor h -> cat(h, each scale's convolutions of h): every output pixel
    depends on h within the largest kernel's reach, zeros beyond the whole tensor."""

    def __init__(self, attention: LinearAttention):
        self.scales = [
            (s.proj_in.weight, s.proj_out.weight, s.proj_out.groups)
            for s in attention.to_qkv_multiscale
        ]
        self.reach = max(w.shape[-1] for w, _, _ in self.scales) // 2

    def need(self, a, b, n, axis):
        return max(0, a - self.reach), min(n, b + self.reach)

    def params(self, lo, hi, a, b, n, axis):
        # zeros to add before and after the crop, and where the outputs lie within it
        return lo - (a - self.reach), b + self.reach - hi, a - lo, b - lo

    def run(self, x, rows, cols, context):
        top, bottom, y0, y1 = rows
        left, right, x0, x1 = cols
        padded = F.pad(x, (left, right, top, bottom))
        found = [x[..., y0:y1, x0:x1]]
        for depthwise, pointwise, groups in self.scales:
            cut = self.reach - depthwise.shape[-1] // 2
            part = padded[..., cut : padded.shape[-2] - cut, cut : padded.shape[-1] - cut]
            part = F.conv2d(part, depthwise, groups=depthwise.shape[0])
            found.append(F.conv2d(part, pointwise, groups=groups))
        return torch.cat(found, dim=1)


class EfficientViTBlock(nn.Module):
    """DC-AE's EfficientViT block: the linear attention (with its residual), then GLUMBConv
    (with its own)."""

    NAMES = (
        Names("attn.to_q.", "attn.to_q.", "context_module.main.qkv.conv.", matrix=True),
        Names("attn.to_k.", "attn.to_k.", "context_module.main.qkv.conv.", matrix=True),
        Names("attn.to_v.", "attn.to_v.", "context_module.main.qkv.conv.", matrix=True),
        Names("attn.to_out.", "attn.to_out.", "context_module.main.proj.conv.", matrix=True),
        Names("attn.norm_out.", "attn.norm_out.", "context_module.main.proj.norm."),
        *(
            Names(f"conv_out.{n.aecli}", f"conv_out.{n.diffusers}", f"local_module.{n.original}")
            for n in GLUMBConv.NAMES
        ),
    )

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], norm_kind: str):
        super().__init__()
        self.attn = LinearAttention(channels, head_dim, scales, norm_kind)
        self.conv_out = GLUMBConv(channels)

    @staticmethod
    def names(scales: int) -> tuple[Names, ...]:
        """NAMES, and those of each scale of the multi-scale q, k, v."""
        found = list(EfficientViTBlock.NAMES)
        for i in range(scales):
            for j, part in enumerate(("proj_in", "proj_out")):
                prefix = f"attn.to_qkv_multiscale.{i}.{part}."
                found.append(Names(prefix, prefix, f"context_module.main.aggreg.{i}.{j}."))
        return tuple(found)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))

    def tile(self, t) -> None:
        t.module(self.attn)
        t.module(self.conv_out)

    @staticmethod
    def flops(channels: int, head_dim: int, scales: tuple[int, ...], pixels: int) -> int:
        attention = LinearAttention.flops(channels, head_dim, scales, pixels)
        return attention + GLUMBConv.flops(channels, pixels)


# -- resampling, and the encoder's last and the decoder's first block --------------------------


class Down(Block):
    """diffusers' DCDownBlock2d: a 3x3 convolution to out / 4 channels and a pixel unshuffle
    (`pixel_unshuffle`), or a strided 3x3 convolution (`conv`); plus, with its shortcut, the
    input pixel-unshuffled and averaged over groups of 4 x channels / out consecutive
    channels."""

    def __init__(self, channels: int, out: int, mode: str, shortcut: bool):
        super().__init__()
        unshuffle = mode == "pixel_unshuffle"
        stride = 1 if unshuffle else 2
        self.conv = nn.Conv2d(channels, out // 4 if unshuffle else out, 3, stride, padding=1)
        self.resample = PixelUnshuffle() if unshuffle else nn.Identity()
        if shortcut:
            self.shortcut = nn.Sequential(PixelUnshuffle(), ChannelMean(4 * channels // out))

    def path(self) -> tuple[nn.Module, ...]:
        return (self.conv, self.resample)

    @staticmethod
    def names(mode: str, shortcut: bool) -> tuple[Names, ...]:
        """The original wraps a block with a shortcut as `main.`, and a pixel unshuffle's
        convolution as `conv.`."""
        original = ("main." if shortcut else "") + ("conv." if mode == "pixel_unshuffle" else "")
        return (Names("conv.", "conv.", f"{original}conv."),)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        """`pixels`: the output's (either way, the convolution costs the same)."""
        return 2 * 9 * channels * out * pixels


class Up(Block):
    """diffusers' DCUpBlock2d: a 3x3 convolution to 4 x out channels and a pixel shuffle
    (`pixel_shuffle`), or nearest upsampling and a 3x3 convolution (`interpolate`); plus, with
    its shortcut, the input's channels each repeated 4 x out / channels times and
    pixel-shuffled."""

    def __init__(self, channels: int, out: int, mode: str, shortcut: bool):
        super().__init__()
        self.interpolate = mode == "interpolate"
        self.conv = nn.Conv2d(channels, out if self.interpolate else 4 * out, 3, padding=1)
        self.resample = blocks.Upsample(2, "nearest") if self.interpolate else PixelShuffle()
        if shortcut:
            self.shortcut = nn.Sequential(RepeatChannels(4 * out // channels), PixelShuffle())

    def path(self) -> tuple[nn.Module, ...]:
        return (self.resample, self.conv) if self.interpolate else (self.conv, self.resample)

    @staticmethod
    def names(shortcut: bool) -> tuple[Names, ...]:
        """The original wraps a block with a shortcut as `main.`; either upsampling holds its
        convolution as `conv.`."""
        return (Names("conv.", "conv.", f"{'main.' if shortcut else ''}conv.conv."),)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        """`pixels`: the output's (either way, the convolution costs the same)."""
        return 2 * 9 * channels * out * pixels


class EncoderOut(Block):
    """The encoder's last block (diffusers' Encoder.conv_out, with `encoder_out_shortcut`): a
    3x3 convolution to the latent, plus the input averaged over groups of channels / out
    consecutive channels."""

    def __init__(self, channels: int, out: int, shortcut: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, out, 3, padding=1)
        if shortcut:
            self.shortcut = ChannelMean(channels // out)

    def path(self) -> tuple[nn.Module, ...]:
        return (self.conv,)

    @staticmethod
    def names(shortcut: bool) -> tuple[Names, ...]:
        """diffusers' encoder.conv_out itself; the original's project_out holds it as the
        first of its ops (`main.`: with the shortcut)."""
        return (Names("conv.", "", f"{'main.' if shortcut else ''}op_list.0.conv."),)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        return 2 * 9 * channels * out * pixels


class DecoderIn(Block):
    """The decoder's first block (diffusers' Decoder.conv_in, with `decoder_in_shortcut`): a
    3x3 convolution from the latent, plus the latent's channels each repeated out / channels
    times."""

    def __init__(self, channels: int, out: int, shortcut: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, out, 3, padding=1)
        if shortcut:
            self.shortcut = RepeatChannels(out // channels)

    def path(self) -> tuple[nn.Module, ...]:
        return (self.conv,)

    @staticmethod
    def names(shortcut: bool) -> tuple[Names, ...]:
        """diffusers' decoder.conv_in itself; the original's project_in (`main.`: with the
        shortcut)."""
        return (Names("conv.", "", f"{'main.' if shortcut else ''}conv."),)

    @staticmethod
    def flops(channels: int, out: int, pixels: int) -> int:
        return 2 * 9 * channels * out * pixels


# -- shapes, for the block registry: ValueError for what diffusers cannot run either ----------


def down_shape(channels: int, spec, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = spec.out
    if spec.mode == "pixel_unshuffle" and out % 4:
        raise ValueError(f"dc_down to {out} channels: a pixel unshuffle needs a multiple of 4")
    if spec.shortcut and (4 * channels) % out:
        raise ValueError(
            f"dc_down from {channels} to {out} channels: its shortcut needs out to divide 4x "
            "the input's channels"
        )
    if shape[1] % 2 or shape[2] % 2:
        raise ValueError(f"dc_down halves {shape[1]}x{shape[2]}: needs even sides")
    return (out, shape[1] // 2, shape[2] // 2)


def up_shape(channels: int, spec, shape: tuple[int, ...]) -> tuple[int, ...]:
    if spec.shortcut and (4 * spec.out) % channels:
        raise ValueError(
            f"dc_up from {channels} to {spec.out} channels: its shortcut needs 4x out to be a "
            "multiple of the input's channels"
        )
    return (spec.out, shape[1] * 2, shape[2] * 2)


def group_shape(channels: int, spec, shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """dc_encoder_out (`out` must divide the channels) and dc_decoder_in (a multiple of
    them)."""
    wide, narrow = (channels, spec.out) if kind == "dc_encoder_out" else (spec.out, channels)
    if spec.shortcut and wide % narrow:
        raise ValueError(
            f"{kind} from {channels} to {spec.out} channels: its shortcut needs {wide} to be "
            f"a multiple of {narrow}"
        )
    return (spec.out, *shape[1:])


def vit_shape(channels: int, spec, shape: tuple[int, ...]) -> tuple[int, ...]:
    if channels < spec.head_dim:
        raise ValueError(
            f"dc_vit on {channels} channels: attention heads of {spec.head_dim} need at least "
            "as many channels"
        )
    if any(k % 2 == 0 for k in spec.scales):
        raise ValueError(f"dc_vit scales {list(spec.scales)}: kernel sizes must be odd")
    return shape

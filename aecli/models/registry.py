"""The closed registry of block types: for each `type` a preset may name, its schema (in
aecli.config), how it is built, the shape it outputs, and whether it ties a model to one input
size. The builder, `aecli info` and inference all ask here; a new block type is one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from aecli.config import (
    ActSpec,
    AttentionSpec,
    BlockSpec,
    ConvSpec,
    ConvTransposeSpec,
    DCDecoderInSpec,
    DCDownSpec,
    DCEncoderOutSpec,
    DCResBlockSpec,
    DCRMSNormSpec,
    DCUpSpec,
    DCViTSpec,
    FlattenSpec,
    HunyuanDownSpec,
    HunyuanInSpec,
    HunyuanOutSpec,
    HunyuanUpSpec,
    LinearSpec,
    NormSpec,
    ResBlockSpec,
    ReshapeSpec,
    ResizeSpec,
    SoftClampSpec,
    TinyBlockSpec,
    UpsampleSpec,
    WanAttentionSpec,
    WanConvSpec,
    WanDownBlockSpec,
    WanNormSpec,
    WanPatchSpec,
    WanResampleSpec,
    WanResBlockSpec,
    WanUnpatchSpec,
    WanUpBlockSpec,
    to_hw,
)
from aecli.models import blocks, dc, hunyuan, wan

Shape = tuple[int, ...]  # one item's shape, without the batch dimension


@dataclass(frozen=True)
class BlockType:
    spec: type
    build: Callable[[object, Shape], nn.Module]  # (spec, input shape) -> module
    out_shape: Callable[[object, Shape], Shape]  # (spec, input shape) -> output shape
    fixed_size: bool = False  # the model then takes one input size only
    needs_image: bool = True  # its input must be (C, H, W)
    # (spec, input shape, output shape) -> one item's forward FLOPs, counted as
    # torch.utils.flop_counter counts them: 2 per multiply-add of convolutions, matrix products
    # and attention; norms, activations and resizing count nothing
    flops: Callable[[object, Shape, Shape], int] = lambda _spec, _in, _out: 0


def fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


# -- conv ----------------------------------------------------------------------------------


def _conv_padding(spec: ConvSpec) -> tuple[int, bool]:
    """(symmetric padding, TensorFlow `same` with stride > 1: padded in forward)."""
    if spec.padding == "same":
        return (0, True) if spec.stride > 1 else (spec.kernel // 2, False)
    return (0 if spec.padding == "valid" else spec.padding), False


def _conv(spec: ConvSpec, shape: Shape) -> nn.Module:
    padding, tf_same = _conv_padding(spec)
    conv = nn.Conv2d(shape[0], spec.out, spec.kernel, spec.stride, padding, bias=spec.bias)
    norm = blocks.norm(spec.norm, spec.out, spec.groups)
    return blocks.ConvBlock(conv, norm, blocks.activation(spec.act), tf_same)


def _conv_shape(spec: ConvSpec, shape: Shape) -> Shape:
    padding, tf_same = _conv_padding(spec)
    if tf_same:
        return (spec.out, *(-(-n // spec.stride) for n in shape[1:]))
    return (spec.out, *((n + 2 * padding - spec.kernel) // spec.stride + 1 for n in shape[1:]))


def _transpose_geometry(spec: ConvTransposeSpec) -> tuple[int, tuple[int, int]]:
    """(padding, crop before and after): Keras `same` crops kernel - stride, the extra pixel
    at the end, so that the output is exactly input x stride."""
    if spec.padding == "same":
        total = max(spec.kernel - spec.stride, 0)
        return 0, (total // 2, total - total // 2)
    return spec.padding, (0, 0)


def _conv_transpose(spec: ConvTransposeSpec, shape: Shape) -> nn.Module:
    padding, crop = _transpose_geometry(spec)
    conv = nn.ConvTranspose2d(
        shape[0], spec.out, spec.kernel, spec.stride, padding, spec.output_padding, bias=spec.bias
    )
    norm = blocks.norm(spec.norm, spec.out, spec.groups)
    return blocks.ConvTransposeBlock(conv, crop, norm, blocks.activation(spec.act))


def _conv_transpose_shape(spec: ConvTransposeSpec, shape: Shape) -> Shape:
    padding, crop = _transpose_geometry(spec)
    size = (
        (n - 1) * spec.stride - 2 * padding + spec.kernel + spec.output_padding - sum(crop)
        for n in shape[1:]
    )
    return (spec.out, *size)


def _conv_flops(spec: ConvSpec, shape: Shape, out: Shape) -> int:
    return 2 * shape[0] * spec.out * spec.kernel**2 * math.prod(out[1:])


def _conv_transpose_flops(spec: ConvTransposeSpec, shape: Shape, _out: Shape) -> int:
    # every input pixel spreads over a kernel's worth of outputs (the crop counts too)
    return 2 * shape[0] * spec.out * spec.kernel**2 * math.prod(shape[1:])


# -- the rest ------------------------------------------------------------------------------


def _same(_spec, shape: Shape) -> Shape:
    return shape


def _linear(spec: LinearSpec, shape: Shape) -> nn.Module:
    if len(shape) != 1:
        raise ValueError(f"needs a vector input, got shape {fmt(shape)}: add a flatten block")
    linear = nn.Linear(shape[0], spec.out, bias=spec.bias)
    return blocks.LinearBlock(linear, blocks.activation(spec.act))


def _reshape(spec: ReshapeSpec, shape: Shape) -> nn.Module:
    if math.prod(spec.shape) != math.prod(shape):
        raise ValueError(f"cannot reshape {fmt(shape)} to {fmt(spec.shape)}")
    return blocks.Reshape(spec.shape)


# -- DC-AE (AutoencoderDC): blocks in aecli.models.dc ---------------------------------------

DC_BLOCKS: dict[str, BlockType] = {
    "dc_resblock": BlockType(
        DCResBlockSpec,
        lambda s, shape: dc.ResBlock(shape[0], s.norm, s.act),
        _same,
        flops=lambda s, shape, _out: dc.ResBlock.flops(shape[0], math.prod(shape[1:])),
    ),
    "dc_vit": BlockType(
        DCViTSpec,
        lambda s, shape: dc.EfficientViTBlock(shape[0], s.head_dim, s.scales, s.norm),
        lambda s, shape: dc.vit_shape(shape[0], s, shape),
        flops=lambda s, shape, _out: dc.EfficientViTBlock.flops(
            shape[0], s.head_dim, s.scales, math.prod(shape[1:])
        ),
    ),
    "dc_down": BlockType(
        DCDownSpec,
        lambda s, shape: dc.Down(shape[0], s.out, s.mode, s.shortcut),
        lambda s, shape: dc.down_shape(shape[0], s, shape),
        flops=lambda s, shape, out: dc.Down.flops(shape[0], s.out, math.prod(out[1:])),
    ),
    "dc_up": BlockType(
        DCUpSpec,
        lambda s, shape: dc.Up(shape[0], s.out, s.mode, s.shortcut),
        lambda s, shape: dc.up_shape(shape[0], s, shape),
        flops=lambda s, shape, out: dc.Up.flops(shape[0], s.out, math.prod(out[1:])),
    ),
    "dc_encoder_out": BlockType(
        DCEncoderOutSpec,
        lambda s, shape: dc.EncoderOut(shape[0], s.out, s.shortcut),
        lambda s, shape: dc.group_shape(shape[0], s, shape, "dc_encoder_out"),
        flops=lambda s, shape, out: dc.EncoderOut.flops(shape[0], s.out, math.prod(out[1:])),
    ),
    "dc_decoder_in": BlockType(
        DCDecoderInSpec,
        lambda s, shape: dc.DecoderIn(shape[0], s.out, s.shortcut),
        lambda s, shape: dc.group_shape(shape[0], s, shape, "dc_decoder_in"),
        flops=lambda s, shape, out: dc.DecoderIn.flops(shape[0], s.out, math.prod(out[1:])),
    ),
    "dc_rms_norm": BlockType(DCRMSNormSpec, lambda s, shape: dc.RMSNorm2d(shape[0]), _same),
}

# -- Wan 2.1 / 2.2 and Qwen-Image: blocks in aecli.models.wan --------------------------------

WAN_BLOCKS: dict[str, BlockType] = {
    "wan_patch": BlockType(
        WanPatchSpec,
        lambda s, _: wan.Patch(s.patch),
        lambda s, shape: wan.patched_shape(shape, s.patch),
    ),
    "wan_unpatch": BlockType(
        WanUnpatchSpec,
        lambda s, _: wan.Unpatch(s.patch),
        lambda s, shape: wan.unpatched_shape(shape, s.patch),
    ),
    "wan_conv": BlockType(
        WanConvSpec,
        lambda s, shape: wan.CausalConv(shape[0], s.out, s.kernel),
        lambda s, shape: (s.out, *shape[1:]),
        flops=lambda s, shape, out: wan.CausalConv.flops(
            shape[0], s.out, s.kernel, math.prod(out[1:])
        ),
    ),
    "wan_resblock": BlockType(
        WanResBlockSpec,
        lambda s, shape: wan.ResBlock(shape[0], s.out or shape[0], s.dropout),
        lambda s, shape: (s.out or shape[0], *shape[1:]),
        flops=lambda s, shape, out: wan.ResBlock.flops(shape[0], out[0], math.prod(out[1:])),
    ),
    "wan_attention": BlockType(
        WanAttentionSpec,
        lambda s, shape: wan.Attention(shape[0]),
        _same,
        flops=lambda s, shape, _out: wan.Attention.flops(shape[0], math.prod(shape[1:])),
    ),
    "wan_norm": BlockType(WanNormSpec, lambda s, shape: wan.RMSNorm(shape[0]), _same),
    "wan_resample": BlockType(
        WanResampleSpec,
        lambda s, shape: (
            wan.Downsample(shape[0], s.time)
            if s.mode == "down"
            else wan.Upsample(shape[0], s.out or shape[0], s.time)
        ),
        lambda s, shape: wan.resampled_shape(shape, s.mode == "down", s.out or shape[0]),
        flops=lambda s, shape, out: (
            wan.Downsample.flops(shape[0], math.prod(out[1:]))
            if s.mode == "down"
            else wan.Upsample.flops(shape[0], out[0], math.prod(out[1:]))
        ),
    ),
    "wan_down_block": BlockType(
        WanDownBlockSpec,
        lambda s, shape: wan.DownBlock(shape[0], s.out, s.blocks, s.down, s.time, s.dropout),
        lambda s, shape: wan.resampled_shape(shape, True, s.out) if s.down else (s.out, *shape[1:]),
        flops=lambda s, shape, _out: wan.DownBlock.flops(
            shape[0], s.out, s.blocks, s.down, math.prod(shape[1:])
        ),
    ),
    "wan_up_block": BlockType(
        WanUpBlockSpec,
        lambda s, shape: wan.UpBlock(shape[0], s.out, s.blocks, s.time, s.dropout),
        lambda s, shape: wan.resampled_shape(shape, False, s.out),
        flops=lambda s, shape, _out: wan.UpBlock.flops(
            shape[0], s.out, s.blocks, math.prod(shape[1:])
        ),
    ),
}


# -- HunyuanImage 2.1: blocks in aecli.models.hunyuan -----------------------------------------

HUNYUAN_BLOCKS: dict[str, BlockType] = {
    "hunyuan_down": BlockType(
        HunyuanDownSpec,
        lambda s, shape: hunyuan.Downsample(shape[0], s.out),
        lambda s, shape: hunyuan.down_shape(shape[0], s.out, shape),
        flops=lambda s, shape, out: hunyuan.Downsample.flops(shape[0], s.out, math.prod(out[1:])),
    ),
    "hunyuan_up": BlockType(
        HunyuanUpSpec,
        lambda s, shape: hunyuan.Upsample(shape[0], s.out),
        lambda s, shape: hunyuan.up_shape(shape[0], s.out, shape),
        flops=lambda s, shape, out: hunyuan.Upsample.flops(shape[0], s.out, math.prod(out[1:])),
    ),
    "hunyuan_in": BlockType(
        HunyuanInSpec,
        lambda s, shape: hunyuan.DecoderIn(shape[0], s.out),
        lambda s, shape: hunyuan.in_shape(shape[0], s.out, shape),
        flops=lambda s, shape, out: hunyuan.DecoderIn.flops(shape[0], s.out, math.prod(out[1:])),
    ),
    "hunyuan_out": BlockType(
        HunyuanOutSpec,
        lambda s, shape: hunyuan.EncoderOut(shape[0], s.out, s.groups),
        lambda s, shape: hunyuan.out_shape(shape[0], s.out, shape),
        flops=lambda s, shape, out: hunyuan.EncoderOut.flops(shape[0], s.out, math.prod(out[1:])),
    ),
}


BLOCKS: dict[str, BlockType] = {
    **DC_BLOCKS,
    **WAN_BLOCKS,
    **HUNYUAN_BLOCKS,
    "conv": BlockType(ConvSpec, _conv, _conv_shape, flops=_conv_flops),
    "conv_transpose": BlockType(
        ConvTransposeSpec, _conv_transpose, _conv_transpose_shape, flops=_conv_transpose_flops
    ),
    "resblock": BlockType(
        ResBlockSpec,
        lambda s, shape: blocks.ResBlock(shape[0], s.out or shape[0], s.groups, s.act, s.dropout),
        lambda s, shape: (s.out or shape[0], *shape[1:]),
        flops=lambda s, shape, out: blocks.ResBlock.flops(shape[0], out[0], math.prod(out[1:])),
    ),
    "tinyblock": BlockType(
        TinyBlockSpec,
        lambda s, shape: blocks.TinyBlock(shape[0], s.out or shape[0], s.act),
        lambda s, shape: (s.out or shape[0], *shape[1:]),
        flops=lambda s, shape, out: blocks.TinyBlock.flops(shape[0], out[0], math.prod(out[1:])),
    ),
    "soft_clamp": BlockType(SoftClampSpec, lambda s, _: blocks.SoftClamp(s.magnitude), _same),
    "attention": BlockType(
        AttentionSpec,
        lambda s, shape: blocks.Attention(shape[0], s.groups),
        _same,
        flops=lambda s, shape, _out: blocks.Attention.flops(shape[0], math.prod(shape[1:])),
    ),
    "norm": BlockType(NormSpec, lambda s, shape: blocks.norm(s.kind, shape[0], s.groups), _same),
    "act": BlockType(ActSpec, lambda s, _: blocks.activation(s.fn), _same, needs_image=False),
    "upsample": BlockType(
        UpsampleSpec,
        lambda s, _: blocks.Upsample(s.factor, s.mode),
        lambda s, shape: (shape[0], shape[1] * s.factor, shape[2] * s.factor),
    ),
    "resize": BlockType(
        ResizeSpec,
        lambda s, _: blocks.Resize(to_hw(s.size), s.mode),
        lambda s, shape: (shape[0], *to_hw(s.size)),
        fixed_size=True,
    ),
    "flatten": BlockType(
        FlattenSpec,
        lambda s, _: nn.Flatten(1),
        lambda s, shape: (math.prod(shape),),
        fixed_size=True,
        needs_image=False,
    ),
    "linear": BlockType(
        LinearSpec,
        _linear,
        lambda s, _: (s.out,),
        fixed_size=True,
        needs_image=False,
        flops=lambda s, shape, _out: 2 * shape[0] * s.out,
    ),
    "reshape": BlockType(
        ReshapeSpec, _reshape, lambda s, _: tuple(s.shape), fixed_size=True, needs_image=False
    ),
}


def block_type(spec: BlockSpec) -> BlockType:
    return BLOCKS[spec.type]


def build_block(spec: BlockSpec, shape: Shape) -> nn.Module:
    """One (non-repeated) block for an input of `shape` (checked with `block_shape` first);
    ValueError or RuntimeError for settings it cannot take."""
    return BLOCKS[spec.type].build(spec, shape)


def block_shape(spec: BlockSpec, shape: Shape) -> Shape:
    """A (non-repeated) block's output shape for an input of `shape`, without building it;
    ValueError for an input it cannot take."""
    entry = BLOCKS[spec.type]
    if entry.needs_image and len(shape) != 3:
        raise ValueError(f"needs an image input (C, H, W), got shape {fmt(shape)}")
    out = tuple(entry.out_shape(spec, shape))
    if any(d <= 0 for d in out):
        raise ValueError(f"input {fmt(shape)} gives an empty output {fmt(out)}")
    return out


def block_flops(spec: BlockSpec, shape: Shape, out: Shape) -> int:
    """One item's forward FLOPs through a (non-repeated) block from `shape` to `out`."""
    return BLOCKS[spec.type].flops(spec, shape, out)


def fixed_size(specs) -> bool:
    """Whether any of these blocks ties the model to one input size."""
    return any(BLOCKS[spec.type].fixed_size for spec in specs)

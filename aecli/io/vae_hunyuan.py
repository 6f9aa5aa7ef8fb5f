"""HunyuanImage 2.1's VAE as an aecli model: diffusers `AutoencoderKLHunyuanImage` folders, read
and written.

One description (`HunyuanLayout`) gives the aecli block config and every tensor's names: aecli's,
diffusers' and the original code's (Tencent's hyimage: latent diffusion's names, levels numbered
as the data flows, as diffusers' scripts/convert_hunyuan_image_to_diffusers.py maps them). The
release itself, `vae_2_1/pytorch_model.ckpt`, is a Python pickle, which aecli never loads, and
diffusers' single-file loader has no converter for this class; the single file read here
(`layout_from_original`) and written by `export --format single-file` is the original layout as
safetensors, as ComfyUI loads it (Comfy-Org's hunyuan_image_2.1_vae_fp16.safetensors).

The encoder ends in the latent's mean and log-variance (no quant_conv), which diffusers'
DiagonalGaussianDistribution splits in two along the channels; its pipelines take images in
[-1, 1], the decoder's output unclamped, and latents as z * scaling_factor (0.75289 for the
release; HunyuanImagePipeline divides by it before decoding).

diffusers' HunyuanImageResnetBlock applies its `conv_shortcut` to the residual branch instead
of the input, so a residual block that changes width cannot run there: every width change is
in a down or up block, which aecli checks, as it checks every size, before building anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from aecli.config import Config, config_from_dict
from aecli.errors import ConfigError, WeightsError, first_line
from aecli.io.vae_files import (
    MAX_LAYERS,
    MAX_LEVELS,
    MAX_PARAMETERS,
    MAX_WIDTH,
    TensorName,
    finite_number,
    layout_mismatch,
    sample_size_of,
    whole_number,
)
from aecli.models import hunyuan

FAMILY = "AutoencoderKLHunyuanImage"
# the block types only this family has (the registry's HUNYUAN_BLOCKS)
BLOCK_TYPES = frozenset({"hunyuan_down", "hunyuan_up", "hunyuan_in", "hunyuan_out"})
_CONV = (("conv.", "", ""),)  # a `conv` block: its Conv2d is `.conv` in aecli
_NORM = (("", "", ""),)  # a `norm` block: the GroupNorm itself


@dataclass(frozen=True)
class HunyuanLayout:
    """The hyperparameters of a diffusers AutoencoderKLHunyuanImage."""

    family: ClassVar[str] = FAMILY

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    spatial_compression_ratio: int
    sample_size: int = 384
    scaling_factor: float = 1.0
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True

    def config(self) -> Config:
        """The aecli config of this layout; training settings as AutoencoderKL's (L1 summed +
        KL 1e-6, Adam (0.5, 0.9))."""
        return config_from_dict(self.raw_config(), "the VAE's configuration")

    def raw_config(self) -> dict:
        encoder = [p.spec for p in _parts(self) if p.where == "encoder"]
        decoder = [p.spec for p in _parts(self) if p.where == "decoder"]
        return {
            "data": {
                "image_size": self.sample_size,
                "channels": self.in_channels,
                "range": "symmetric",
            },
            "model": {
                "encoder": encoder,
                "latent": {
                    "channels": self.latent_channels,
                    "variational": True,
                    "head": False,
                    "scaling_factor": self.scaling_factor,
                },
                "decoder": decoder,
                "output": "none",
            },
            "loss": {"reconstruction": "l1", "reduction": "sum", "kl_weight": 1.0e-6},
            "optim": {"name": "adam", "lr": 3.6e-5, "betas": [0.5, 0.9]},
            "train": {"epochs": 10, "batch_size": 8},
        }

    def diffusers_config(self) -> dict:
        """config.json as diffusers writes it for AutoencoderKLHunyuanImage."""
        return {
            "_class_name": FAMILY,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "spatial_compression_ratio": self.spatial_compression_ratio,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "downsample_match_channel": self.downsample_match_channel,
            "upsample_match_channel": self.upsample_match_channel,
        }

    def names(self) -> list[TensorName]:
        """Every tensor of the model under its three names."""
        return [name for part in _parts(self) for name in part.tensors()]

    @property
    def resamplings(self) -> int:
        """The down (and up) blocks: one after each level but the last, while the levels so far
        are fewer than log2(spatial_compression_ratio), as diffusers builds them."""
        levels = len(self.block_out_channels)
        return sum(1 for i in range(levels - 1) if i < math.log2(self.spatial_compression_ratio))


@dataclass(frozen=True)
class _Part:
    """One aecli block of the layout: its spec, aecli prefix, the diffusers and release
    prefixes, and its tensors' suffixes (aecli, diffusers, release)."""

    where: str  # encoder or decoder
    spec: dict
    aecli: str
    diffusers: str = ""
    original: str = ""
    suffixes: tuple[tuple[str, str, str], ...] = ()

    def tensors(self) -> Iterator[TensorName]:
        for a, d, o in self.suffixes:
            for param in ("weight", "bias"):
                yield TensorName(
                    f"{self.aecli}.{a}{param}",
                    f"{self.diffusers}.{d}{param}",
                    f"{self.original}.{o}{param}",
                )


def _parts(layout: HunyuanLayout) -> list[_Part]:
    """The blocks of the layout in order, as diffusers' HunyuanImageEncoder2D and
    HunyuanImageDecoder2D build them; ValueError where diffusers builds a model it cannot run."""
    parts: list[_Part] = []
    index = {"encoder": 0, "decoder": 0}

    def add(where, spec, diffusers="", original="", suffixes=()):
        parts.append(_Part(where, spec, f"{where}.{index[where]}", diffusers, original, suffixes))
        index[where] += 1

    def resblock(where, channels, out, diffusers, original):
        if channels != out:
            raise ValueError(
                f"a residual block from {channels} to {out} channels, which diffusers' "
                "HunyuanImageResnetBlock cannot run (its conv_shortcut takes the wrong tensor): "
                "widths change in the down and up blocks only (match_channel true)"
            )
        spec = {"type": "resblock", "groups": hunyuan.GROUPS}
        add(where, spec, diffusers, original, hunyuan.RESBLOCK_NAMES)

    def middle(where, channels):
        resblock(where, channels, channels, f"{where}.mid_block.resnets.0", f"{where}.mid.block_1")
        spec = {"type": "attention", "groups": hunyuan.GROUPS}
        d, o = f"{where}.mid_block.attentions.0", f"{where}.mid.attn_1"
        add(where, spec, d, o, hunyuan.ATTENTION_NAMES)
        resblock(where, channels, channels, f"{where}.mid_block.resnets.1", f"{where}.mid.block_2")

    def conv(out):
        return {"type": "conv", "out": out, "kernel": 3, "stride": 1, "padding": 1}

    widths, layers = layout.block_out_channels, layout.layers_per_block
    resamplings, latent = layout.resamplings, layout.latent_channels
    # encoder: conv_in; per level its residual blocks, then a down block; the middle; the output
    # (diffusers numbers down_blocks through the levels, residual and down blocks alike)
    add("encoder", conv(widths[0]), "encoder.conv_in", "encoder.conv_in", _CONV)
    channels, k = widths[0], 0
    for i, width in enumerate(widths):
        for j in range(layers):
            d, o = f"encoder.down_blocks.{k}", f"encoder.down.{i}.block.{j}"
            resblock("encoder", channels, width, d, o)
            channels, k = width, k + 1
        if i < resamplings:
            out = widths[i + 1] if layout.downsample_match_channel else width
            _resampling("down", channels, out)
            spec = {"type": "hunyuan_down", "out": out}
            d, o = f"encoder.down_blocks.{k}", f"encoder.down.{i}.downsample"
            add("encoder", spec, d, o, hunyuan.Downsample.NAMES)
            channels, k = out, k + 1
    _middle_width(channels, widths[-1], "encoder")
    middle("encoder", channels)
    spec = {"type": "hunyuan_out", "out": 2 * latent, "groups": hunyuan.GROUPS}
    add("encoder", spec, "encoder", "encoder", hunyuan.EncoderOut.NAMES)
    # decoder: conv_in with its shortcut, the middle, per level (widest first) its residual
    # blocks and an up block, then GroupNorm, SiLU and conv_out
    widths = tuple(reversed(widths))
    spec = {"type": "hunyuan_in", "out": widths[0]}
    add("decoder", spec, "decoder.conv_in", "decoder.conv_in", hunyuan.DecoderIn.NAMES)
    middle("decoder", widths[0])
    channels, k = widths[0], 0
    for i, width in enumerate(widths):
        for j in range(layers + 1):
            d, o = f"decoder.up_blocks.{k}", f"decoder.up.{i}.block.{j}"
            resblock("decoder", channels, width, d, o)
            channels, k = width, k + 1
        if i < resamplings:
            out = widths[i + 1] if layout.upsample_match_channel else width
            _resampling("up", channels, out)
            spec = {"type": "hunyuan_up", "out": out}
            d, o = f"decoder.up_blocks.{k}", f"decoder.up.{i}.upsample"
            add("decoder", spec, d, o, hunyuan.Upsample.NAMES)
            channels, k = out, k + 1
    _middle_width(channels, widths[-1], "decoder")
    norm = {"type": "norm", "kind": "group", "groups": hunyuan.GROUPS}
    add("decoder", norm, "decoder.norm_out", "decoder.norm_out", _NORM)
    add("decoder", {"type": "act", "fn": "silu"})
    add("decoder", conv(layout.out_channels), "decoder.conv_out", "decoder.conv_out", _CONV)
    return parts


def _resampling(kind: str, channels: int, out: int) -> None:
    """ValueError for a down or up block diffusers builds but cannot run."""
    if kind == "down" and (out % 4 or (4 * channels) % out):
        raise ValueError(
            f"a down block from {channels} to {out} channels: diffusers' HunyuanImageDownsample "
            "needs a multiple of 4 that divides 4x its input's"
        )
    if kind == "up" and (4 * out) % channels:
        raise ValueError(
            f"an up block from {channels} to {out} channels: diffusers' HunyuanImageUpsample "
            "needs 4x its output a multiple of its input's"
        )


def _middle_width(channels: int, width: int, where: str) -> None:
    if channels != width:
        raise ValueError(
            f"the {where} reaches its last level with {channels} channels where its norm_out "
            f"has {width}: diffusers cannot run it"
        )


# -- recognising a layout ----------------------------------------------------------------------


def layout_from_diffusers_config(raw: dict, path: Path) -> HunyuanLayout:
    """The layout an AutoencoderKLHunyuanImage config.json describes; anything aecli cannot
    build, or of absurd size, is refused before anything is allocated."""
    try:
        given = raw["block_out_channels"]
        if not isinstance(given, list) or not 1 <= len(given) <= MAX_LEVELS:
            raise ValueError(f"block_out_channels: a list of 1 to {MAX_LEVELS} widths")
        widths = tuple(
            whole_number(w, "block_out_channels", hunyuan.GROUPS, MAX_WIDTH) for w in given
        )
        if any(w % hunyuan.GROUPS for w in widths):
            raise ValueError(
                f"block_out_channels: every width a multiple of {hunyuan.GROUPS} (its GroupNorms' "
                "groups)"
            )
        layers = whole_number(raw["layers_per_block"], "layers_per_block", 0, MAX_LAYERS)
        latent = whole_number(raw["latent_channels"], "latent_channels", 1, 1024)
        if widths[-1] % (2 * latent):
            raise ValueError(
                f"block_out_channels: the last width ({widths[-1]}) must be a multiple of twice "
                f"latent_channels ({latent})"
            )
        ratio = whole_number(
            raw["spatial_compression_ratio"], "spatial_compression_ratio", 1, 2**MAX_LEVELS
        )
        flags = {}
        for key in ("downsample_match_channel", "upsample_match_channel"):
            flags[key] = raw.get(key, True)
            if not isinstance(flags[key], bool):
                raise ValueError(f"{key}: {str(flags[key])[:40]} is not true or false")
        # diffusers' default is None, which its pipelines cannot divide by: aecli takes 1
        scale = raw.get("scaling_factor")
        scale = finite_number(1.0 if scale is None else scale, "scaling_factor")
        if scale <= 0:
            raise ValueError(f"scaling_factor: {scale} is not positive")
        layout = HunyuanLayout(
            in_channels=whole_number(raw["in_channels"], "in_channels", 1, 4),
            out_channels=whole_number(raw["out_channels"], "out_channels", 1, 4),
            latent_channels=latent,
            block_out_channels=widths,
            layers_per_block=layers,
            spatial_compression_ratio=ratio,
            sample_size=sample_size_of(raw["sample_size"]),
            scaling_factor=scale,
            **flags,
        )
        # about the parameters (3x3 convolutions dominate), before anything is allocated
        weights = sum(9 * w * w * (4 * layers + 10) for w in widths)
        if weights > MAX_PARAMETERS:
            raise WeightsError(
                f"an {FAMILY} of about {weights:.2e} parameters; aecli builds at most "
                f"{MAX_PARAMETERS:.1e}",
                path=path,
            )
        _parts(layout)  # the widths, level by level, as diffusers can run them
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"lacks {exc}" if isinstance(exc, KeyError) else first_line(exc)[:200]
        raise WeightsError(f"unusable {FAMILY} config ({reason})", path=path) from None
    return layout


def layout_of_config(config: Config) -> tuple[HunyuanLayout | None, str]:
    """The AutoencoderKLHunyuanImage layout an aecli config has, or (None, the first thing
    that differs)."""
    model, latent = config.model, config.model.latent
    if not latent.spatial or not latent.variational or latent.head:
        return None, (
            f"model.latent: {FAMILY} has a spatial variational latent that is the encoder's "
            "output (variational: true, head: false)"
        )
    if latent.statistics is not None or latent.shift_factor != 0.0:
        return None, f"model.latent: {FAMILY} takes one scaling_factor, no shift or statistics"
    if not isinstance(latent.scaling_factor, float):
        return None, f"model.latent.scaling_factor: {FAMILY} has one for every channel"
    if model.output != "none" or config.data.range != "symmetric":
        return (
            None,
            f"{FAMILY} works on images in [-1, 1] (data.range symmetric, model.output none)",
        )
    encoder = [s for s in model.encoder for _ in range(getattr(s, "repeat", 1))]
    decoder = [s for s in model.decoder for _ in range(getattr(s, "repeat", 1))]
    if encoder[-1].type != "hunyuan_out" or decoder[0].type != "hunyuan_in":
        return None, f"model: not the {FAMILY} layout (hunyuan_out ends its encoder)"
    try:
        # the levels: conv_in's width, then each down block's; a level's residual blocks
        # before the middle (resblock, attention, resblock) and the output
        path = encoder[1:-4]
        downs = [s.out for s in path if s.type == "hunyuan_down"]
        blocks = sum(1 for s in path if s.type == "resblock")
        layers = next((i for i, s in enumerate(path) if s.type != "resblock"), len(path))
        levels = blocks // layers if layers else len(downs) + 1
        widths = [encoder[0].out, *downs]
        widths += [widths[-1]] * (levels - len(widths))
        layout = HunyuanLayout(
            in_channels=config.data.channels,
            out_channels=decoder[-1].out,
            latent_channels=latent.channels,
            block_out_channels=tuple(widths),
            layers_per_block=layers,
            spatial_compression_ratio=2 ** len(downs),
            sample_size=config.data.size[0],
            scaling_factor=latent.scaling_factor,
        )
        reference = layout.config().model
    except (AttributeError, IndexError, ValueError, ConfigError):
        return None, f"model: not the {FAMILY} layout"
    why = layout_mismatch(model, reference, FAMILY)
    return (None, why) if why else (layout, "")


# -- the original layout as one file (ComfyUI's) -----------------------------------------------

# the release's factor (its config.json); a single file carries none
RELEASE_SCALING = {64: 0.75289}


def layout_from_original(shapes: dict[str, tuple[int, ...]], path: Path) -> HunyuanLayout | None:
    """The layout of a single file in the original key layout, from its tensors' shapes; None
    for another family's keys. Latent diffusion's own files (AutoencoderKL's) have the same
    names but number their up levels from the highest resolution, whose level never upsamples,
    and hold quant_conv: here decoder.up.0 (the lowest resolution) upsamples."""
    if "decoder.up.0.upsample.conv.weight" not in shapes or "quant_conv.weight" in shapes:
        return None
    if "encoder.down.0.downsample.conv.weight" not in shapes:
        return None

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise WeightsError(
                f"missing tensor {name} for its {FAMILY} layout (original keys)", path=path
            )
        return shapes[name]

    try:
        widths = []
        while f"encoder.down.{len(widths)}.block.0.conv1.weight" in shapes:
            widths.append(shapes[f"encoder.down.{len(widths)}.block.0.conv1.weight"][0])
        layers = 0
        while f"encoder.down.0.block.{layers}.conv1.weight" in shapes:
            layers += 1
        downs = sum(
            1 for i in range(len(widths)) if f"encoder.down.{i}.downsample.conv.weight" in shapes
        )
        latent = shape("decoder.conv_in.weight")[1]
        layout = HunyuanLayout(
            in_channels=shape("encoder.conv_in.weight")[1],
            out_channels=shape("decoder.conv_out.weight")[0],
            latent_channels=latent,
            block_out_channels=tuple(widths),
            layers_per_block=layers,
            spatial_compression_ratio=2**downs,
            scaling_factor=RELEASE_SCALING.get(latent, 1.0),
        )
        if not widths or len(widths) > MAX_LEVELS or layers > MAX_LAYERS:
            raise ValueError(f"{len(widths)} levels of {layers} residual blocks")
        if min(widths) < 1 or latent < 1:
            raise ValueError("an empty convolution")
        if any(w % hunyuan.GROUPS for w in widths) or widths[-1] % (2 * latent):
            raise ValueError(f"widths {list(widths)} for {latent} latent channels")
        _parts(layout)
    except (IndexError, ValueError) as exc:
        reason = "a weight of too few dimensions" if isinstance(exc, IndexError) else exc
        raise WeightsError(
            f"not an {FAMILY} file aecli can build ({str(reason)[:200]})", path=path
        ) from None
    return layout

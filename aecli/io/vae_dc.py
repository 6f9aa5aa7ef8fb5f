"""DC-AE (the SANA VAE and mit-han-lab's dc-ae-f32c32 / f64c128 / f128c512 releases) as aecli
models: diffusers `AutoencoderDC` folders, read and written, and DC-AE's original checkpoints
(mit-han-lab/dc-ae-*: efficientvit's key names), read and written.

One description (`DCLayout`) gives the aecli block config and every tensor's three names:
aecli's, diffusers' and the original checkpoint's, which is diffusers'
convert_autoencoder_dc_checkpoint_to_diffusers (loaders/single_file_utils.py) inverted. The
original holds each attention's q, k and v projections as one `qkv` tensor that diffusers
splits in three: the three names share the original one (`TensorName.fused`).

DC-AE is deterministic (the encoder's output is the latent); its pipelines (SANA) take images
in [-1, 1], the decoder's output unclamped, and latents as z * scaling_factor (0.41407 for
SANA 1.0; SanaPipeline divides by it before decoding).

An original checkpoint carries no configuration: aecli reads the architecture from the
tensors' names and shapes. What they cannot show is taken as every release has it: the
decoder's activations (ReLU where its norm is BatchNorm, else SiLU; ReLU before the last
convolution), the attention head width where no multi-scale projection shows it (32), the
width of a first level that has no blocks (half the second's) and the scaling factor: SANA
1.0's for its layout, and for the in-1.0 and mix-1.0 releases of each of f32c32, f64c128 and
f128c512, which have the same shapes and different factors, mix-1.0's (as diffusers'
single-file loader takes them); the layout's `note` says so in one line, with how to choose
the other (`--scaling-factor`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
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
from aecli.models import dc

FAMILY = "AutoencoderDC"
BLOCK_TYPES = frozenset(
    {"dc_resblock", "dc_vit", "dc_down", "dc_up", "dc_encoder_out", "dc_decoder_in", "dc_rms_norm"}
)
BLOCKS = ("ResBlock", "EfficientViTBlock")
NORMS = {"rms_norm": "rms", "batch_norm": "batch"}
ACTIVATIONS = {"relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu"}
DOWNSAMPLES = ("pixel_unshuffle", "conv")
UPSAMPLES = ("pixel_shuffle", "interpolate")
SAMPLE_SIZE = 1024  # config.json has none; SANA 1.0's images
# diffusers' AutoencoderDC defaults, for keys a config.json leaves out
WIDTHS = (128, 256, 512, 512, 1024, 1024)
SCALES = ((), (), (), (5,), (5,), (5,))

# the scaling factors of the releases, by (latent channels, levels): SANA 1.0 (f32c32 with
# blocks at the first level), and in-1.0 / mix-1.0 (none there), whose files have the same shapes
SANA = 0.41407
TWINS = {
    (32, 6): ("dc-ae-f32c32", 0.3189, 0.4552),
    (128, 7): ("dc-ae-f64c128", 0.2889, 0.4538),
    (512, 8): ("dc-ae-f128c512", 0.4883, 0.3620),
}


@dataclass(frozen=True)
class Level:
    """One resolution of the encoder or the decoder: its width, its blocks (`layers` of one
    `block` type), the attention's multi-scale kernels, and (decoder) its norm and activation."""

    width: int
    layers: int
    block: str = "ResBlock"
    scales: tuple[int, ...] = ()
    norm: str = "rms_norm"
    act: str = "silu"


@dataclass(frozen=True)
class DCLayout:
    """The hyperparameters of a diffusers AutoencoderDC."""

    family: ClassVar[str] = FAMILY

    in_channels: int
    latent_channels: int
    encoder: tuple[Level, ...]
    decoder: tuple[Level, ...]
    head_dim: int = 32
    downsample: str = "pixel_unshuffle"
    upsample: str = "pixel_shuffle"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    out_act: str = "relu"
    sample_size: int = SAMPLE_SIZE
    scaling_factor: float = 1.0
    note: str = field(default="", compare=False)  # what a single file cannot tell, in words

    def config(self) -> Config:
        """The aecli config of this layout; training settings for fine-tuning: L1, Adam 1e-4."""
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
                    "head": False,
                    "scaling_factor": self.scaling_factor,
                },
                "decoder": decoder,
                "output": "none",
            },
            "loss": {"reconstruction": "l1"},
            "optim": {"name": "adam", "lr": 1.0e-4},
            "train": {"epochs": 10, "batch_size": 8},
        }

    def diffusers_config(self) -> dict:
        """config.json as diffusers writes it for AutoencoderDC."""
        enc, dec = self.encoder, self.decoder
        return {
            "_class_name": FAMILY,
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "attention_head_dim": self.head_dim,
            "encoder_block_types": [level.block for level in enc],
            "decoder_block_types": [level.block for level in dec],
            "encoder_block_out_channels": [level.width for level in enc],
            "decoder_block_out_channels": [level.width for level in dec],
            "encoder_layers_per_block": [level.layers for level in enc],
            "decoder_layers_per_block": [level.layers for level in dec],
            "encoder_qkv_multiscales": [list(level.scales) for level in enc],
            "decoder_qkv_multiscales": [list(level.scales) for level in dec],
            "upsample_block_type": self.upsample,
            "downsample_block_type": self.downsample,
            "decoder_norm_types": [level.norm for level in dec],
            "decoder_act_fns": [level.act for level in dec],
            "encoder_out_shortcut": self.encoder_out_shortcut,
            "decoder_in_shortcut": self.decoder_in_shortcut,
            "decoder_conv_act_fn": self.out_act,
            "scaling_factor": self.scaling_factor,
        }

    def names(self) -> list[TensorName]:
        """Every tensor of the model under its three names (`ldm`: the original checkpoint's),
        from the model's own tensors and each block's `dc.Names`."""
        from aecli.models import build_model

        model = build_model(self.config(), meta=True)
        found = []
        for part in _parts(self):
            module = getattr(model, part.where)[part.index]
            for key in module.state_dict():
                names = max(
                    (n for n in part.names if key.startswith(n.aecli)), key=lambda n: len(n.aecli)
                )
                rest = key[len(names.aecli) :]
                found.append(
                    TensorName(
                        f"{part.where}.{part.index}.{key}",
                        part.diffusers + names.diffusers + rest,
                        part.original + names.original + rest,
                        matrix=names.matrix and rest == "weight",
                    )
                )
        # the original's one qkv tensor for diffusers' to_q, to_k and to_v
        shared: dict[str, list[str]] = {}
        for name in found:
            shared.setdefault(name.ldm, []).append(name.aecli)
        return [
            TensorName(n.aecli, n.diffusers, n.ldm, n.matrix, tuple(shared[n.ldm]))
            if len(shared[n.ldm]) > 1
            else n
            for n in found
        ]


@dataclass(frozen=True)
class _Part:
    """One aecli block of the layout: its spec, where it sits (encoder or decoder, and its
    index there), the diffusers and original prefixes and its tensors' `dc.Names`."""

    where: str
    index: int
    spec: dict
    diffusers: str = ""
    original: str = ""
    names: tuple[dc.Names, ...] = ()


def _parts(layout: DCLayout) -> list[_Part]:
    """The blocks of the layout in order, as diffusers' Encoder and Decoder (autoencoder_dc.py)
    build them."""
    parts = _PartList(layout)
    parts.encoder()
    parts.decoder()
    return parts.parts


_PLAIN = (dc.Names("conv.", "", "conv."),)  # a convolution's own tensors


def _conv(out: int) -> dict:
    return {"type": "conv", "out": out, "kernel": 3, "stride": 1, "padding": 1}


class _PartList:
    """The parts of a layout, added in order, each numbered within the encoder or decoder."""

    def __init__(self, layout: DCLayout):
        self.layout = layout
        self.parts: list[_Part] = []
        self.count = {"encoder": 0, "decoder": 0}

    def add(self, where, spec, diffusers="", original="", names=()) -> None:
        self.parts.append(_Part(where, self.count[where], spec, diffusers, original, tuple(names)))
        self.count[where] += 1

    def block(self, where: str, level: Level, d: str, o: str) -> None:
        if level.block == "ResBlock":
            spec = {"type": "dc_resblock", "norm": NORMS[level.norm], "act": level.act}
            self.add(where, spec, d, o, dc.ResBlock.NAMES)
        else:
            spec = {
                "type": "dc_vit",
                "head_dim": self.layout.head_dim,
                "scales": list(level.scales),
                "norm": NORMS[level.norm],
            }
            self.add(where, spec, d, o, dc.EfficientViTBlock.names(len(level.scales)))

    def encoder(self) -> None:
        """conv_in (a down block without shortcut where the first level has no blocks); per
        level its blocks, then a down block; conv_out with its shortcut."""
        layout, add = self.layout, self.add
        enc, last = layout.encoder, len(layout.encoder) - 1
        if enc[0].layers:
            add("encoder", _conv(enc[0].width), "encoder.conv_in.", "encoder.project_in.", _PLAIN)
        else:
            spec = {
                "type": "dc_down",
                "out": enc[1].width,
                "mode": layout.downsample,
                "shortcut": False,
            }
            names = dc.Down.names(layout.downsample, False)
            add("encoder", spec, "encoder.conv_in.", "encoder.project_in.", names)
        for i, level in enumerate(enc):
            for j in range(level.layers):
                d, o = f"encoder.down_blocks.{i}.{j}.", f"encoder.stages.{i}.op_list.{j}."
                self.block("encoder", level, d, o)
            if i < last and level.layers:
                spec = {"type": "dc_down", "out": enc[i + 1].width, "mode": layout.downsample}
                d, o = (
                    f"encoder.down_blocks.{i}.{level.layers}.",
                    f"encoder.stages.{i}.op_list.{level.layers}.",
                )
                add("encoder", spec, d, o, dc.Down.names(layout.downsample, True))
        shortcut = layout.encoder_out_shortcut
        spec = {"type": "dc_encoder_out", "out": layout.latent_channels, "shortcut": shortcut}
        names = dc.EncoderOut.names(shortcut)
        add("encoder", spec, "encoder.conv_out.", "encoder.project_out.", names)

    def decoder(self) -> None:
        """conv_in with its shortcut; per level (the smallest first) an up block, then its
        blocks; the RMS norm, the activation and conv_out (an up block without shortcut where
        the first level has no blocks)."""
        layout, add = self.layout, self.add
        dec, last = layout.decoder, len(layout.encoder) - 1
        shortcut = layout.decoder_in_shortcut
        spec = {"type": "dc_decoder_in", "out": dec[-1].width, "shortcut": shortcut}
        names = dc.DecoderIn.names(shortcut)
        add("decoder", spec, "decoder.conv_in.", "decoder.project_in.", names)
        for i in reversed(range(len(dec))):
            level, first = dec[i], 0
            if i < last and level.layers:
                spec = {"type": "dc_up", "out": level.width, "mode": layout.upsample}
                d, o = f"decoder.up_blocks.{i}.0.", f"decoder.stages.{i}.op_list.0."
                add("decoder", spec, d, o, dc.Up.names(True))
                first = 1
            for j in range(first, first + level.layers):
                d, o = f"decoder.up_blocks.{i}.{j}.", f"decoder.stages.{i}.op_list.{j}."
                self.block("decoder", level, d, o)
        norm = (dc.Names("", "", ""),)
        o = "decoder.project_out.op_list.0."
        add("decoder", {"type": "dc_rms_norm"}, "decoder.norm_out.", o, norm)
        add("decoder", {"type": "act", "fn": layout.out_act})
        d, o = "decoder.conv_out.", "decoder.project_out.op_list.2."
        if dec[0].layers:
            add("decoder", _conv(layout.in_channels), d, o, _PLAIN)
        else:
            spec = {
                "type": "dc_up",
                "out": layout.in_channels,
                "mode": layout.upsample,
                "shortcut": False,
            }
            add("decoder", spec, d, o, dc.Up.names(False))


# -- a diffusers config.json -------------------------------------------------------------------


def layout_from_diffusers_config(raw: dict, path: Path) -> DCLayout:
    """The layout an AutoencoderDC config.json describes; anything aecli cannot build, or of
    absurd size, is refused before anything is allocated."""
    try:
        encoder = _levels(raw, "encoder")
        decoder = _levels(raw, "decoder")
        if len(encoder) != len(decoder):
            raise ValueError(
                f"{len(encoder)} encoder levels and {len(decoder)} decoder levels: no round trip"
            )
        layout = DCLayout(
            in_channels=whole_number(raw.get("in_channels", 3), "in_channels", 1, 4),
            latent_channels=whole_number(
                raw.get("latent_channels", 32), "latent_channels", 1, MAX_WIDTH
            ),
            encoder=encoder,
            decoder=decoder,
            head_dim=whole_number(raw.get("attention_head_dim", 32), "attention_head_dim", 1, 1024),
            downsample=_resampling(raw, "downsample_block_type", DOWNSAMPLES),
            upsample=_resampling(raw, "upsample_block_type", UPSAMPLES[::-1]),
            encoder_out_shortcut=_flag(raw, "encoder_out_shortcut"),
            decoder_in_shortcut=_flag(raw, "decoder_in_shortcut"),
            out_act=ACTIVATIONS[_choice(raw, "decoder_conv_act_fn", "relu", tuple(ACTIVATIONS))],
            sample_size=sample_size_of(raw.get("sample_size", SAMPLE_SIZE)),
            scaling_factor=finite_number(raw.get("scaling_factor", 1.0), "scaling_factor"),
        )
        if layout.scaling_factor <= 0:
            raise ValueError("scaling_factor must be positive")
        _check(layout)
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"unusable {FAMILY} config ({first_line(exc)[:200]})", path=path
        ) from None
    parameters = _parameters(layout)
    if parameters > MAX_PARAMETERS:
        raise WeightsError(
            f"an {FAMILY} of about {parameters:.2e} parameters; aecli builds at most "
            f"{MAX_PARAMETERS:.1e}",
            path=path,
        )
    return layout


def _levels(raw: dict, part: str) -> tuple[Level, ...]:
    """The encoder's or decoder's levels, every value checked."""
    widths = raw.get(f"{part}_block_out_channels", list(WIDTHS))
    key = f"{part}_block_out_channels"
    if not isinstance(widths, list) or not 1 <= len(widths) <= MAX_LEVELS:
        raise ValueError(f"{key}: a list of 1 to {MAX_LEVELS} widths")
    levels = len(widths)
    widths = [whole_number(w, key, 1, MAX_WIDTH) for w in widths]
    default_layers = [2, 2, 2, 3, 3, 3] if part == "encoder" else [3] * 6
    layers = _per_level(raw, f"{part}_layers_per_block", default_layers, levels)
    layers = [whole_number(n, f"{part}_layers_per_block", 0, MAX_LAYERS) for n in layers]
    kinds = _per_level(raw, f"{part}_block_types", "ResBlock", levels)
    scales = _per_level(raw, f"{part}_qkv_multiscales", [list(s) for s in SCALES], levels)
    norms, acts = ["rms_norm"] * levels, ["silu"] * levels  # the encoder's, fixed
    if part == "decoder":
        norms = _per_level(raw, "decoder_norm_types", "rms_norm", levels)
        acts = _per_level(raw, "decoder_act_fns", "silu", levels)
    found = []
    for i in range(levels):
        if kinds[i] not in BLOCKS:
            raise ValueError(
                f"{part}_block_types: {str(kinds[i])[:40]!r}; {FAMILY} has {' and '.join(BLOCKS)}"
            )
        if not isinstance(scales[i], list) or len(scales[i]) > 4:
            raise ValueError(f"{part}_qkv_multiscales: a list of at most 4 kernel sizes per level")
        kernels = tuple(whole_number(k, f"{part}_qkv_multiscales", 1, 31) for k in scales[i])
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"{part}_qkv_multiscales: kernel sizes must be odd")
        norm, act = norms[i], acts[i]
        if norm not in NORMS:
            raise ValueError(
                f"decoder_norm_types: {str(norm)[:40]!r}; aecli builds rms_norm and batch_norm"
            )
        if act not in ACTIVATIONS:
            raise ValueError(
                f"decoder_act_fns: {str(act)[:40]!r}; aecli builds {', '.join(ACTIVATIONS)}"
            )
        found.append(Level(widths[i], layers[i], kinds[i], kernels, norm, ACTIVATIONS[act]))
    return tuple(found)


def _per_level(raw: dict, key: str, default, levels: int) -> list:
    """A value given once for every level (a string) or as a list of one per level."""
    value = raw.get(key, default)
    if isinstance(value, str):
        return [value] * levels
    if not isinstance(value, list) or len(value) != levels:
        raise ValueError(f"{key}: one per level ({levels})")
    return value


def _resampling(raw: dict, key: str, kinds: tuple[str, str]) -> str:
    """A resampling type as diffusers builds it: `kinds[0]` where config.json names it, the
    other for any other name (the releases write "Conv" and "InterpolateConv", which diffusers
    builds as a strided convolution and a pixel shuffle, and export writes as what they are,
    conv and pixel_shuffle); the default is pixel (un)shuffle."""
    value = raw.get(key, kinds[0] if kinds[0].startswith("pixel") else kinds[1])
    if not isinstance(value, str) or not 0 < len(value) <= 40:
        raise ValueError(f"{key}: {str(value)[:40]!r} is not a block type's name")
    return kinds[0] if value == kinds[0] else kinds[1]


def _choice(raw: dict, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        raise ValueError(f"{key}: {str(value)[:40]!r}; aecli builds {' and '.join(allowed)}")
    return value


def _flag(raw: dict, key: str) -> bool:
    value = raw.get(key, True)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: {str(value)[:40]!r} is not true or false")
    return value


def _check(layout: DCLayout) -> None:
    """ValueError for what diffusers builds but cannot run (or builds with another meaning)."""
    latent = layout.latent_channels
    for part, levels in (("encoder", layout.encoder), ("decoder", layout.decoder)):
        if any(level.layers == 0 for level in levels[1:]):
            raise ValueError(
                f"{part}_layers_per_block: a level without blocks after the first changes the "
                "model's scale, which aecli does not build"
            )
        if levels[0].layers == 0 and len(levels) < 2:
            raise ValueError(f"{part}_layers_per_block: one level, without blocks")
        for i, level in enumerate(levels):
            if (
                level.layers
                and level.block == "EfficientViTBlock"
                and level.width < layout.head_dim
            ):
                raise ValueError(
                    f"{part} level {i}: {level.width} channels, fewer than attention_head_dim "
                    f"{layout.head_dim}"
                )
    # the shortcuts diffusers adds (it checks none of them): channel counts that divide
    widths = [level.width for level in layout.encoder]
    for i in range(len(widths) - 1):
        if (
            layout.encoder[i].layers
            and layout.downsample == "pixel_unshuffle"
            and widths[i + 1] % 4
        ):
            raise ValueError(f"encoder_block_out_channels: {widths[i + 1]} is not a multiple of 4")
        if layout.encoder[i].layers and (4 * widths[i]) % widths[i + 1]:
            raise ValueError(
                f"encoder_block_out_channels: {widths[i + 1]} does not divide 4 x {widths[i]}"
            )
    widths = [level.width for level in layout.decoder]
    for i in range(len(widths) - 1):
        if layout.decoder[i].layers and (4 * widths[i]) % widths[i + 1]:
            raise ValueError(
                f"decoder_block_out_channels: {widths[i + 1]} does not divide 4 x {widths[i]}"
            )
    first = layout.encoder[1].width if len(layout.encoder) > 1 else 0
    if layout.encoder[0].layers == 0 and layout.downsample == "pixel_unshuffle" and first % 4:
        raise ValueError(f"encoder_block_out_channels: {first} is not a multiple of 4")
    if layout.encoder_out_shortcut and layout.encoder[-1].width % latent:
        raise ValueError(
            f"encoder_out_shortcut: latent_channels {latent} does not divide the encoder's last "
            f"width {layout.encoder[-1].width}"
        )
    if layout.decoder_in_shortcut and layout.decoder[-1].width % latent:
        raise ValueError(
            f"decoder_in_shortcut: latent_channels {latent} does not divide the decoder's last "
            f"width {layout.decoder[-1].width}"
        )


def _parameters(layout: DCLayout) -> int:
    """About the model's parameters (an upper bound), from its widths alone."""
    total = 0
    for levels in (layout.encoder, layout.decoder):
        for level in levels:
            w = level.width
            per_block = 18 * w * w if level.block == "ResBlock" else 22 * w * w
            total += level.layers * per_block + 36 * w * w  # and a resampling block's
    return total


# -- an aecli config ---------------------------------------------------------------------------


def layout_of_config(config: Config) -> tuple[DCLayout | None, str]:
    """The AutoencoderDC layout an aecli config has, or (None, the first thing that differs)."""
    model, latent = config.model, config.model.latent
    types = {spec.type for spec in [*model.encoder, *model.decoder]}
    if not types & BLOCK_TYPES:
        return None, f"model: not the {FAMILY} layout (no DC-AE blocks)"
    if not latent.spatial or latent.variational or latent.head:
        return None, (
            f"model.latent: {FAMILY} has a spatial deterministic latent that is the encoder's "
            "output (variational: false, head: false)"
        )
    if model.output != "none" or config.data.range != "symmetric":
        return (
            None,
            f"{FAMILY} works on images in [-1, 1] (data.range symmetric, model.output none)",
        )
    if isinstance(latent.scaling_factor, list) or latent.shift_factor != 0.0:
        return None, f"model.latent: {FAMILY} scales its latents by one factor, without a shift"
    encoder = [s for s in model.encoder for _ in range(getattr(s, "repeat", 1))]
    decoder = [s for s in model.decoder for _ in range(getattr(s, "repeat", 1))]
    try:
        layout = DCLayout(
            in_channels=config.data.channels,
            latent_channels=latent.channels,
            encoder=_encoder_levels(encoder),
            decoder=_decoder_levels(decoder),
            head_dim=next((s.head_dim for s in encoder + decoder if s.type == "dc_vit"), 32),
            downsample=next((s.mode for s in encoder if s.type == "dc_down"), "pixel_unshuffle"),
            upsample=next((s.mode for s in decoder if s.type == "dc_up"), "pixel_shuffle"),
            encoder_out_shortcut=encoder[-1].shortcut,
            decoder_in_shortcut=decoder[0].shortcut,
            out_act=decoder[-2].fn,
            sample_size=config.data.size[0],
            scaling_factor=latent.scaling_factor,
        )
        reference = layout.config().model
    except (AttributeError, IndexError, KeyError, ConfigError):
        return None, f"model: not the {FAMILY} layout"
    why = layout_mismatch(model, reference, FAMILY)
    return (None, why) if why else (layout, "")


_KIND = {"dc_resblock": "ResBlock", "dc_vit": "EfficientViTBlock"}
_NORM = {v: k for k, v in NORMS.items()}


def _level(width: int, specs: list) -> Level:
    """A level of `width` whose blocks are `specs` (its first block's type, scales, norm and
    activation; the layout's own comparison finds the rest)."""
    if not specs:
        return Level(width, 0)
    first = specs[0]
    return Level(
        width,
        len(specs),
        _KIND[first.type],
        tuple(getattr(first, "scales", ())),
        _NORM[first.norm],
        getattr(first, "act", "silu"),
    )


def _encoder_levels(specs: list) -> tuple[Level, ...]:
    """The encoder's levels: its first block opens the first level (a convolution) or the
    second (a down block without shortcut: the first level has no blocks); each down block
    opens the next; the last block is the output."""
    levels, width, current = [], specs[0].out, []
    for spec in specs[1:-1]:
        if spec.type == "dc_down":
            levels.append(_level(width, current))
            width, current = spec.out, []
        else:
            current.append(spec)
    levels.append(_level(width, current))
    if specs[0].type == "dc_down":  # the first level has no blocks
        levels.insert(0, _unseen(levels[0]))
    return tuple(levels)


def _decoder_levels(specs: list) -> tuple[Level, ...]:
    """The decoder's levels, the smallest first in the blocks and last in the result: each up
    block opens the next level; the norm, activation and output close it."""
    levels, width, current = [], specs[0].out, []
    for spec in specs[1:-3]:
        if spec.type == "dc_up":
            levels.append(_level(width, current))
            width, current = spec.out, []
        else:
            current.append(spec)
    levels.append(_level(width, current))
    if specs[-1].type == "dc_up":  # the first level has no blocks
        levels.append(_unseen(levels[-1]))
    return tuple(reversed(levels))


def _unseen(second: Level) -> Level:
    """A first level without blocks, which no tensor shows: as the second, at half its width
    (as every release has it)."""
    return replace(second, width=max(1, second.width // 2), layers=0)


# -- DC-AE's original checkpoints (mit-han-lab/dc-ae-*: model.safetensors) --------------------

_OP = re.compile(r"(encoder|decoder)\.stages\.(\d+)\.op_list\.(\d+)\.(.+)")


def layout_from_original(shapes: dict[str, tuple[int, ...]], path: Path) -> DCLayout | None:
    """The layout of a DC-AE original checkpoint (efficientvit's DCAE state dict), from its
    tensors' names and shapes; None for a file that is not one."""
    if "decoder.project_out.op_list.0.weight" not in shapes or not any(
        k.startswith("encoder.project_out.") for k in shapes
    ):
        return None
    try:
        return _original(shapes)
    except (KeyError, IndexError, ValueError) as exc:
        reason = f"it has no tensor {exc}" if isinstance(exc, KeyError) else first_line(exc)
        raise WeightsError(
            f"not a DC-AE checkpoint aecli knows ({FAMILY}: {reason[:200]})", path=path
        ) from None


def _original(shapes: dict[str, tuple[int, ...]]) -> DCLayout:
    encoder, decoder = _original_levels(shapes)
    count = len(encoder)
    latent_key = "encoder.project_out.main.op_list.0.conv.weight"
    out_shortcut = latent_key in shapes
    latent_key = latent_key if out_shortcut else "encoder.project_out.op_list.0.conv.weight"
    latent = shapes[latent_key][0]
    project_in = "encoder.project_in.conv.weight"
    if project_in not in shapes:
        project_in = "encoder.project_in.conv.conv.weight"
    in_channels = shapes[project_in][1]
    downsample, upsample = _original_resampling(shapes, encoder, decoder, project_in)
    scaling, note = _original_scaling(latent, count, encoder[0].layers > 0)
    layout = DCLayout(
        in_channels=in_channels,
        latent_channels=latent,
        encoder=tuple(encoder),
        decoder=tuple(decoder),
        head_dim=_head_dim(shapes, encoder + decoder),
        downsample=downsample,
        upsample=upsample,
        encoder_out_shortcut=out_shortcut,
        decoder_in_shortcut="decoder.project_in.main.conv.weight" in shapes,
        scaling_factor=scaling,
        note=note,
    )
    _check(layout)
    return layout


def _original_levels(shapes: dict[str, tuple[int, ...]]) -> tuple[list[Level], list[Level]]:
    """The encoder's and the decoder's levels, from the blocks each stage's op_list holds."""
    # {(encoder or decoder, level): {op: ResBlock, EfficientViTBlock or resample}}
    ops: dict[tuple[str, int], dict[int, str]] = {}
    for key in shapes:
        found = _OP.fullmatch(key)
        if found:
            part, stage, op, rest = found.groups()
            kind = "resample"  # a down or up block: main.conv[.conv].*
            if rest.startswith(("main.conv1.", "main.conv2.")):
                kind = "ResBlock"
            elif rest.startswith(("context_module.", "local_module.")):
                kind = "EfficientViTBlock"
            ops.setdefault((part, int(stage)), {})[int(op)] = kind
    count = 1 + max(stage for _, stage in ops)
    encoder, decoder = [], []
    for part, levels in (("encoder", encoder), ("decoder", decoder)):
        for i in range(count):
            stage = ops.get((part, i), {})
            blocks = sorted(j for j, kind in stage.items() if kind != "resample")
            if not blocks:
                levels.append(None)
                continue
            prefix = f"{part}.stages.{i}.op_list.{blocks[0]}."
            kind = stage[blocks[0]]
            if kind == "ResBlock":
                width = shapes[prefix + "main.conv1.conv.weight"][0]
                batch = prefix + "main.conv2.norm.running_mean" in shapes
            else:
                width = shapes[prefix + "context_module.main.qkv.conv.weight"][1]
                batch = prefix + "context_module.main.proj.norm.running_mean" in shapes
            scales = []
            while f"{prefix}context_module.main.aggreg.{len(scales)}.0.weight" in shapes:
                scales.append(
                    shapes[f"{prefix}context_module.main.aggreg.{len(scales)}.0.weight"][-1]
                )
            norm = "batch_norm" if batch else "rms_norm"
            levels.append(
                Level(width, len(blocks), kind, tuple(scales), norm, "relu" if batch else "silu")
            )
    for levels in (encoder, decoder):
        if levels[0] is None and len(levels) > 1 and levels[1] is not None:
            levels[0] = _unseen(levels[1])
        if any(level is None for level in levels):
            raise ValueError("a level without blocks after the first")
    return encoder, decoder


def _original_resampling(
    shapes: dict[str, tuple[int, ...]], encoder: list[Level], decoder: list[Level], project_in: str
) -> tuple[str, str]:
    """How the encoder goes down (`conv` or `pixel_unshuffle`) and the decoder up
    (`interpolate` or `pixel_shuffle`), from the resample blocks' convolutions."""
    downsample = "conv"
    for i, level in enumerate(encoder[:-1]):
        if (
            level.layers
            and f"encoder.stages.{i}.op_list.{level.layers}.main.conv.conv.weight" in shapes
        ):
            downsample = "pixel_unshuffle"
    if encoder[0].layers == 0 and project_in.endswith("conv.conv.weight"):
        downsample = "pixel_unshuffle"
    upsample = "interpolate"
    for i, level in enumerate(decoder[:-1]):
        key = f"decoder.stages.{i}.op_list.0.main.conv.conv.weight"
        if level.layers and shapes[key][0] == 4 * level.width:
            upsample = "pixel_shuffle"
    if decoder[0].layers == 0:
        out = shapes["decoder.project_out.op_list.2.conv.conv.weight"][0]
        upsample = "pixel_shuffle" if out == 4 * shapes[project_in][1] else upsample
    return downsample, upsample


def _original_scaling(latent: int, levels: int, first_level_blocks: bool) -> tuple[float, str]:
    """The scaling factor of the release with these shapes, and what to say of it: a single
    file does not carry one."""
    if (latent, levels) == (32, 6) and first_level_blocks:
        return SANA, ""
    if (latent, levels) in TWINS and not first_level_blocks:
        name, other, scaling = TWINS[latent, levels]
        return scaling, (
            f"{name}-mix-1.0's scaling factor {scaling:g}, as diffusers takes it; {name}-in-1.0 "
            f"has the same shapes: give --scaling-factor {other:g} for it"
        )
    return 1.0, "a single file does not carry its scaling factor: give --scaling-factor"


def _head_dim(shapes: dict[str, tuple[int, ...]], levels: list[Level]) -> int:
    """The attention heads' width: a multi-scale projection's channels per group where there is
    one, else 32 (every release's), checked against the q, k, v projection's width."""
    for key, shape in shapes.items():
        if key.endswith("context_module.main.aggreg.0.1.weight"):
            return shape[1]
    for key, shape in shapes.items():
        if key.endswith("context_module.main.qkv.conv.weight"):
            inner, width = shape[0] // 3, shape[1]
            if width // 32 * 32 != inner:
                raise ValueError(f"its attention projections ({key}) are not in heads of 32")
    return 32

"""Stable Diffusion-family VAEs as aecli models: diffusers `AutoencoderKL` folders and single-file
checkpoints in the original latent-diffusion key layout, read and written.

One description of the layout (`KLLayout`) gives both the aecli block config and every tensor's
three names (aecli, diffusers, latent diffusion), so reading, writing and checking share a
single table. Files are safetensors only; nothing here runs code from a file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from aecli.config import Config, config_from_dict
from aecli.errors import ConfigError, WeightsError, first_and_more, first_line
from aecli.io.jsonfile import read_json_file
from aecli.io.tensorfile import tensor_file_bytes
from aecli.models import blocks

# Scaling and shift factors per latent width when a file does not say (a single file never
# does): SD 1.x / 2.x for 4 channels (SDXL's 0.13025 has the same layout), FLUX.1 for 16
# (SD3's 1.5305 / 0.0609 has the same layout); --scaling-factor / --shift-factor override them.
KNOWN_FACTORS = {4: (0.18215, 0.0), 16: (0.3611, 0.1159)}

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

# Tensors of a latent-diffusion training checkpoint that are not part of the VAE (the loss's
# discriminator and learned log-variance); a full Stable Diffusion checkpoint keeps its VAE
# under first_stage_model.
IGNORED_LDM_PREFIXES = ("loss.",)
FULL_CHECKPOINT_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class KLLayout:
    """The hyperparameters of a diffusers AutoencoderKL (the latent-diffusion kl-f* family)."""

    family: ClassVar[str] = "AutoencoderKL"

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_groups: int = 32
    quant_conv: bool = True
    post_quant_conv: bool = True
    mid_attention: bool = True
    sample_size: int = 256
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    decoder_block_out_channels: tuple[int, ...] | None = None  # FLUX.2's smaller decoder

    def config(self) -> Config:
        """The aecli config of this layout; training settings as cat-kl-f8's first phase (L1
        summed + KL 1e-6, Adam (0.5, 0.9)), without its discriminator and LPIPS, which
        `--set loss.disc_weight=...` / `loss.perceptual_weight=...` add."""
        return config_from_dict(self.raw_config(), "the VAE's configuration")

    def raw_config(self) -> dict:
        encoder, decoder = [], []
        for part in _parts(self):
            if part.where == "encoder":
                encoder.append(part.spec)
            elif part.where == "decoder":
                decoder.append(part.spec)
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
                    "head": self.quant_conv,
                    "scaling_factor": self.scaling_factor,
                    "shift_factor": self.shift_factor,
                },
                "decoder": decoder,
                "output": "none",
            },
            "loss": {"reconstruction": "l1", "reduction": "sum", "kl_weight": 1.0e-6},
            "optim": {"name": "adam", "lr": 3.6e-5, "betas": [0.5, 0.9]},
            "train": {"epochs": 10, "batch_size": 8},
        }

    def diffusers_config(self) -> dict:
        """config.json as diffusers writes it for AutoencoderKL."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor or None,
            "force_upcast": True,
            "use_quant_conv": self.quant_conv,
            "use_post_quant_conv": self.post_quant_conv,
            "mid_block_add_attention": self.mid_attention,
        }

    def names(self) -> list[TensorName]:
        """Every tensor of the model under its three names."""
        return [name for part in _parts(self) for name in part.tensors()]


@dataclass(frozen=True)
class TensorName:
    aecli: str
    diffusers: str
    ldm: str
    matrix: bool = False  # diffusers stores attention projections as (C, C), aecli as (C, C, 1, 1)
    # the aecli tensors that the ldm file holds as this one, concatenated along the first
    # dimension in this order (DC-AE's original qkv: diffusers' to_q, to_k, to_v); () for none
    fused: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Part:
    """One aecli module of the layout: its block spec, aecli prefix and the two source prefixes."""

    where: str  # encoder, latent_head or decoder
    spec: dict
    aecli: str
    diffusers: str | None
    ldm: str | None
    shortcut: bool = False

    def tensors(self) -> Iterator[TensorName]:
        kind = self.spec["type"] if self.where != "latent_head" else "head"
        suffixes: list[tuple[str, str, str]] = {
            "conv": [("conv.", "", "")],
            "head": [("", "", "")],
            "norm": [("", "", "")],
            "resblock": list(blocks.ResBlock.NAMES[: None if self.shortcut else -1]),
            "attention": list(blocks.Attention.NAMES),
        }.get(kind, [])
        for a, d, ldm in suffixes:
            for param in ("weight", "bias"):
                yield TensorName(
                    f"{self.aecli}.{a}{param}",
                    f"{self.diffusers}.{d}{param}",
                    f"{self.ldm}.{ldm}{param}",
                    matrix=kind == "attention" and a != "norm." and param == "weight",
                )


def _parts(layout: KLLayout) -> list[_Part]:
    """The modules of the layout in order, as diffusers' Encoder / Decoder build them."""
    parts: list[_Part] = []
    groups = layout.norm_groups
    index = {"encoder": 0, "decoder": 0}

    def add(where, spec, diffusers=None, ldm=None, shortcut=False):
        if where == "latent_head":
            prefix = "latent_head.0"
        else:
            prefix = f"{where}.{index[where]}"
            index[where] += 1
        parts.append(_Part(where, spec, prefix, diffusers, ldm, shortcut))

    def conv(out, kernel=3, stride=1, padding=1):
        return {"type": "conv", "out": out, "kernel": kernel, "stride": stride, "padding": padding}

    def resblock(where, channels, out, diffusers, ldm):
        spec = {"type": "resblock", "out": out, "groups": groups}
        add(where, spec, diffusers, ldm, shortcut=channels != out)

    def middle(where, channels):
        resblock(where, channels, channels, f"{where}.mid_block.resnets.0", f"{where}.mid.block_1")
        if layout.mid_attention:
            spec = {"type": "attention", "groups": groups}
            add(where, spec, f"{where}.mid_block.attentions.0", f"{where}.mid.attn_1")
        resblock(where, channels, channels, f"{where}.mid_block.resnets.1", f"{where}.mid.block_2")

    def tail(where, channels, out):
        norm = {"type": "norm", "kind": "group", "groups": groups}
        add(where, norm, f"{where}.conv_norm_out", f"{where}.norm_out")
        add(where, {"type": "act", "fn": "silu"})
        add(where, conv(out), f"{where}.conv_out", f"{where}.conv_out")

    widths = layout.block_out_channels
    levels = len(widths)
    # encoder: conv_in, per level resnets then a stride-2 conv (diffusers pads right and bottom
    # by one pixel, which is TensorFlow's `same` for the even sizes aecli feeds it), middle, out
    add("encoder", conv(widths[0]), "encoder.conv_in", "encoder.conv_in")
    channels = widths[0]
    for i, out in enumerate(widths):
        for j in range(layout.layers_per_block):
            d, ldm = f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"
            resblock("encoder", channels, out, d, ldm)
            channels = out
        if i < levels - 1:
            d, ldm = (
                f"encoder.down_blocks.{i}.downsamplers.0.conv",
                f"encoder.down.{i}.downsample.conv",
            )
            add("encoder", conv(out, stride=2, padding="same"), d, ldm)
    middle("encoder", channels)
    tail("encoder", channels, 2 * layout.latent_channels)
    if layout.quant_conv:
        add("latent_head", {}, "quant_conv", "quant_conv")
    # decoder: post_quant_conv, conv_in, middle, per level (reversed) resnets then upsampling;
    # latent diffusion numbers its up levels from the highest resolution
    widths = layout.decoder_block_out_channels or widths
    latent = layout.latent_channels
    if layout.post_quant_conv:
        add("decoder", conv(latent, kernel=1, padding=0), "post_quant_conv", "post_quant_conv")
    channels = widths[-1]
    add("decoder", conv(channels), "decoder.conv_in", "decoder.conv_in")
    middle("decoder", channels)
    for i, out in enumerate(reversed(widths)):
        level = levels - 1 - i
        for j in range(layout.layers_per_block + 1):
            d, ldm = f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}"
            resblock("decoder", channels, out, d, ldm)
            channels = out
        if i < levels - 1:
            add("decoder", {"type": "upsample", "factor": 2})
            d, ldm = f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"
            add("decoder", conv(out), d, ldm)
    tail("decoder", channels, layout.out_channels)
    return parts


# -- recognising a layout ----------------------------------------------------------------------


def layout_from_diffusers_config(raw: dict, path: Path) -> KLLayout:
    """The layout a diffusers config.json describes; anything aecli cannot build is refused."""
    name = raw.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise WeightsError(
            f"a diffusers {name}; aecli reads AutoencoderKL (the SD / SDXL / SD3 / FLUX VAE)",
            path=path,
        )
    try:
        given = raw["block_out_channels"]
        if not isinstance(given, list) or not 1 <= len(given) <= MAX_LEVELS:
            raise ValueError(f"block_out_channels: a list of 1 to {MAX_LEVELS} widths")
        widths = tuple(whole_number(w, "block_out_channels", 1, MAX_WIDTH) for w in given)
        for key, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            kinds = raw.get(key, [allowed] * len(widths))
            if not isinstance(kinds, list) or len(kinds) != len(widths):
                raise ValueError(f"{key}: one per level of block_out_channels")
            if any(k != allowed for k in kinds):
                raise WeightsError(f"{key}: aecli builds {allowed} only", path=path)
        if raw.get("act_fn", "silu") != "silu":
            raise WeightsError("act_fn: aecli builds silu only", path=path)
        latent = whole_number(raw.get("latent_channels", 4), "latent_channels", 1, 1024)
        layers = whole_number(raw.get("layers_per_block", 1), "layers_per_block", 1, MAX_LAYERS)
        groups = whole_number(raw.get("norm_num_groups", 32), "norm_num_groups", 1, min(widths))
        scale = KNOWN_FACTORS.get(latent, (1.0, 0.0))[0]  # diffusers writes one; older may not
        layout = KLLayout(
            in_channels=whole_number(raw.get("in_channels", 3), "in_channels", 1, 4),
            out_channels=whole_number(raw.get("out_channels", 3), "out_channels", 1, 4),
            block_out_channels=widths,
            layers_per_block=layers,
            latent_channels=latent,
            norm_groups=groups,
            quant_conv=bool(raw.get("use_quant_conv", True)),
            post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
            mid_attention=bool(raw.get("mid_block_add_attention", True)),
            sample_size=sample_size_of(raw.get("sample_size", 256)),
            scaling_factor=finite_number(raw.get("scaling_factor") or scale, "scaling_factor"),
            shift_factor=finite_number(raw.get("shift_factor") or 0.0, "shift_factor"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"lacks {exc}" if isinstance(exc, KeyError) else first_line(exc)[:200]
        raise WeightsError(f"unusable AutoencoderKL config ({reason})", path=path) from None
    # about the parameters (3x3 convolutions dominate), before anything is allocated
    weights = sum(9 * w * w * (4 * layers + 3) for w in widths)
    if weights > MAX_PARAMETERS:
        raise WeightsError(
            f"an AutoencoderKL of about {weights:.2e} parameters; aecli "
            f"builds at most {MAX_PARAMETERS:.1e}",
            path=path,
        )
    return layout


# What a config.json may ask for: beyond any released VAE (SD, SDXL, SD3, FLUX: 4 levels of at
# most 512 channels, 2 layers each) by far, and checked before anything is built.
MAX_LEVELS, MAX_WIDTH, MAX_LAYERS, MAX_PARAMETERS = 8, 8192, 16, 2**32


def whole_number(value, key: str, low: int, high: int) -> int:
    """A config value that must be a whole number from `low` to `high` (4.5 is not 4)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: {repr(value)[:40]} is not a whole number")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{key}: {value} is not a whole number")
    if not low <= value <= high:
        shown = f"{value:.0f}" if abs(value) < 1e30 else "a number of over 30 digits"
        raise ValueError(f"{key}: {shown} is not from {low} to {high}")
    return int(value)


def finite_number(value, key: str) -> float:
    try:  # an int past float's range overflows here
        number = float(value) if isinstance(value, int | float) else math.nan
    except OverflowError:
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{key}: {str(value)[:40]!r} is not a finite number")
    return number


def sample_size_of(value) -> int:
    first = value[0] if isinstance(value, list) and value else value
    return whole_number(first, "sample_size", 8, 65536)


def layout_from_shapes(shapes: dict[str, tuple[int, ...]], naming: str, path: Path) -> KLLayout:
    """The layout of a single-file VAE, from its tensor shapes (`naming`: ldm or diffusers).
    GroupNorm's group count leaves no trace in the shapes: every known VAE uses 32."""
    ldm = naming == "ldm"

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise WeightsError(f"not a VAE file aecli knows: it has no tensor {name}", path=path)
        return shapes[name]

    def down(i, j):
        return f"encoder.down.{i}.block.{j}" if ldm else f"encoder.down_blocks.{i}.resnets.{j}"

    widths = [shape(f"{down(0, 0)}.conv1.weight")[0]]
    while f"{down(len(widths), 0)}.conv1.weight" in shapes:
        widths.append(shapes[f"{down(len(widths), 0)}.conv1.weight"][0])
    layers = 0
    while f"{down(0, layers)}.conv1.weight" in shapes:
        layers += 1
    latent = shape("decoder.conv_in.weight")[1]
    attention = (
        "encoder.mid.attn_1.q.weight" if ldm else "encoder.mid_block.attentions.0.to_q.weight"
    )
    legacy = "encoder.mid_block.attentions.0.query.weight"
    scale, shift = KNOWN_FACTORS.get(latent, (1.0, 0.0))
    return KLLayout(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        latent_channels=latent,
        quant_conv="quant_conv.weight" in shapes,
        post_quant_conv="post_quant_conv.weight" in shapes,
        mid_attention=attention in shapes or legacy in shapes,
        scaling_factor=scale,
        shift_factor=shift,
    )


def naming_of(keys) -> str | None:
    """ldm or diffusers, from the key names of a VAE state dict; None for neither."""
    keys = set(keys)
    if "encoder.conv_in.weight" not in keys:
        return None
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers"
    if any(k.startswith("encoder.down.") for k in keys):
        return "ldm"
    return None


# Attention names of diffusers before 0.14, which from_pretrained still reads.
_LEGACY_ATTENTION = {
    "to_q.": "query.",
    "to_k.": "key.",
    "to_v.": "value.",
    "to_out.0.": "proj_attn.",
}


def source_names(layout, naming: str, available) -> dict[str, TensorName]:
    """{name in the file: TensorName} for every tensor of the layout; legacy diffusers attention
    names are used where the file has them."""
    available = set(available)
    found = {}
    for name in layout.names():
        key = name.diffusers if naming == "diffusers" else name.ldm
        if naming == "diffusers" and key not in available:
            for new, old in _LEGACY_ATTENTION.items():
                if f".attentions.0.{new}" in key:
                    legacy = key.replace(f".attentions.0.{new}", f".attentions.0.{old}")
                    key = legacy if legacy in available else key
        found[key] = name
    return found


def check_shapes(
    layout,
    naming: str,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    path: Path,
) -> dict[str, TensorName]:
    """Every tensor the layout needs, with the aecli model's shape, and no other; one line
    naming the first missing, unexpected or misshapen key."""
    wanted = source_names(layout, naming, shapes)
    missing = [k for k in wanted if k not in shapes]
    if missing:
        raise WeightsError(
            f"missing tensor {first_and_more(missing)} for its {layout.family} layout", path=path
        )
    extra = [k for k in shapes if k not in wanted]
    if extra:
        raise WeightsError(
            f"unexpected tensor {first_and_more(extra)} (not part of an {layout.family} of this "
            "layout)",
            path=path,
        )
    for key, name in wanted.items():
        target = expected[name.aecli]
        if name.fused and key == name.ldm:
            target = (sum(expected[part][0] for part in name.fused), *target[1:])
        want = (
            target[:2]
            if name.matrix and naming == "diffusers" and len(shapes[key]) == 2
            else target
        )
        if tuple(shapes[key]) != tuple(want):
            raise WeightsError(
                f"tensor {key} has shape {list(shapes[key])}, its {layout.family} layout needs "
                f"{list(want)}",
                path=path,
            )
    return wanted


def to_aecli(tensors: dict[str, torch.Tensor], wanted: dict[str, TensorName], expected) -> dict:
    """The file's tensors under aecli's names and shapes, as float32 (a counter, such as
    BatchNorm's num_batches_tracked, as int64); a fused tensor is split into its parts."""
    found = {}
    for key, name in wanted.items():
        tensor = tensors[key].to(torch.float32 if tensors[key].is_floating_point() else torch.int64)
        if name.fused and key == name.ldm:
            pieces = tensor.split([expected[part][0] for part in name.fused])
            found.update(zip(name.fused, pieces, strict=True))
        else:
            found[name.aecli] = tensor
    return {part: tensor.reshape(expected[part]) for part, tensor in found.items()}


def from_aecli(state: dict[str, torch.Tensor], layout, naming: str) -> dict:
    """An aecli state dict under diffusers' or latent diffusion's names and shapes."""
    out = {}
    for name in layout.names():
        tensor = state[name.aecli].detach().to("cpu").contiguous()
        if naming == "diffusers":
            out[name.diffusers] = tensor.flatten(1) if name.matrix else tensor
        elif name.fused:
            out[name.ldm] = torch.cat([state[part].detach().to("cpu") for part in name.fused])
        else:
            out[name.ldm] = tensor
    return out


def layout_of_config(config: Config, decoder_widths: bool = False) -> tuple[KLLayout | None, str]:
    """The AutoencoderKL layout an aecli config has, or (None, the first thing that differs).
    `decoder_widths`: the decoder may have its own widths (FLUX.2's decoder_block_out_channels;
    AutoencoderKL has none)."""
    model, latent = config.model, config.model.latent
    if not latent.spatial or not latent.variational:
        return None, "model.latent: AutoencoderKL has a spatial variational latent"
    if latent.statistics is not None:
        return None, "model.latent.statistics: AutoencoderKL keeps none (AutoencoderKLFlux2 does)"
    if model.output != "none" or config.data.range != "symmetric":
        return (
            None,
            "AutoencoderKL works on images in [-1, 1] (data.range symmetric, model.output none)",
        )
    encoder = [s for s in model.encoder for _ in range(getattr(s, "repeat", 1))]
    decoder = [s for s in model.decoder for _ in range(getattr(s, "repeat", 1))]
    res = [s for s in encoder if s.type == "resblock"]
    if encoder[0].type != "conv" or not res:
        return None, "model.encoder: AutoencoderKL starts with a convolution and residual blocks"
    layers = 0
    while layers + 1 < len(encoder) and encoder[layers + 1].type == "resblock":
        layers += 1
    # each level's width: the `out` of its last residual block before a downsampling
    widths, current = [], encoder[0].out
    for spec in encoder[1:]:
        if spec.type == "resblock":
            current = spec.out or current
        elif spec.type == "conv" and spec.stride == 2:
            widths.append(current)
    widths.append(current)
    # the decoder's own widths (FLUX.2's may be smaller): each level's first residual block
    # after the two of the middle, layers + 1 per level, highest resolution last
    decoder_res = [s for s in decoder if s.type == "resblock"]
    own = tuple(reversed([s.out for s in decoder_res[2 :: layers + 1][: len(widths)] if s.out]))
    first = decoder[0]
    post = first.type == "conv" and first.kernel == 1 and first.out == latent.channels
    layout = KLLayout(
        in_channels=config.data.channels,
        out_channels=decoder[-1].out if decoder[-1].type == "conv" else config.data.channels,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        latent_channels=latent.channels,
        norm_groups=res[0].groups,
        quant_conv=latent.head,
        post_quant_conv=post,
        mid_attention=any(s.type == "attention" for s in encoder),
        sample_size=config.data.size[0],
        scaling_factor=latent.scaling_factor,
        shift_factor=latent.shift_factor,
        decoder_block_out_channels=own if decoder_widths and own != tuple(widths) else None,
    )
    try:
        reference = layout.config().model
    except ConfigError:
        return None, "model: not the AutoencoderKL layout"
    why = layout_mismatch(model, reference, "AutoencoderKL")
    return (None, why) if why else (layout, "")


def layout_mismatch(model, reference, family: str) -> str:
    """The first block where an aecli model config differs from a family's layout, in words
    (`model.decoder.14 is resblock out=64; AutoencoderKL has resblock out=32 there`); '' where
    none does."""
    for where, specs, theirs in (
        ("model.encoder", model.encoder, reference.encoder),
        ("model.decoder", model.decoder, reference.decoder),
    ):
        mine = [(i, s) for i, s in enumerate(specs) for _ in range(getattr(s, "repeat", 1))]
        for j in range(max(len(mine), len(theirs))):
            index, spec = mine[j] if j < len(mine) else (len(specs), None)
            want = theirs[j] if j < len(theirs) else None
            if spec_dump(spec) != spec_dump(want):
                return f"{where}.{index} is {spec_text(spec)}; {family} has {spec_text(want)} there"
    return ""


def spec_dump(spec) -> dict | None:
    return None if spec is None else spec.model_dump(exclude={"repeat"})


def spec_text(spec) -> str:
    if spec is None:
        return "nothing"
    fields = spec.model_dump(exclude_defaults=True, exclude={"type", "repeat"})
    return " ".join([spec.type] + [f"{k}={v}" for k, v in fields.items()])


JSON_LIMIT = 1 << 20  # a diffusers config.json is about 1 kB


def read_json(path: Path) -> dict:
    try:
        raw = read_json_file(path, JSON_LIMIT)
    except ValueError as exc:
        raise WeightsError(f"unreadable JSON ({exc})", path=path) from None
    if not isinstance(raw, dict):
        raise WeightsError("not a JSON object", path=path)
    return raw


def export_files(state: dict[str, torch.Tensor], layout, fmt: str) -> dict[str, bytes]:
    """{relative file name: bytes} of a VAE in `fmt`: diffusers (config.json and
    diffusion_pytorch_model.safetensors, what the family's from_pretrained reads) or
    single-file (one .safetensors in the latent-diffusion key layout; AutoencoderKL)."""
    naming = "diffusers" if fmt == "diffusers" else "ldm"
    tensors = from_aecli(state, layout, naming)
    data = tensor_file_bytes(tensors, {"format": "pt"})
    if fmt == "single-file":
        return {"": data}
    config = json.dumps(layout.diffusers_config(), indent=2) + "\n"
    return {DIFFUSERS_CONFIG: config.encode(), DIFFUSERS_WEIGHTS[0]: data}

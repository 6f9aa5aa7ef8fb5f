"""The TAESD family (TAESD, TAESDXL, TAESD3, TAEF1) as aecli models: diffusers `AutoencoderTiny`
folders, read and written, and TAESD's own encoder and decoder files, read.

One description (`TinyLayout`) gives the aecli block config and every tensor's names. aecli's
encoder and decoder hold the same modules in the same order as diffusers' `EncoderTiny.layers`
and `DecoderTiny.layers` (the decoder adds its latent clamp as module 0, as TAESD's own
`Decoder` does), so a tensor's name is its module's index plus the module's own tensor names
(`blocks.TinyBlock`), with aecli's convolution blocks holding their Conv2d as `.conv`.

diffusers' AutoencoderTiny takes images in [-1, 1] and maps them to [0, 1] inside; aecli gives
the model its images in [0, 1] directly (`data.range: unit`), and its decoder's output is in
[0, 1] (`model.output: none`).
"""

from __future__ import annotations

import re
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

FAMILY = "AutoencoderTiny"
ACTIVATIONS = {"relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu"}
CLAMP = 3.0  # DecoderTiny.forward: torch.tanh(x / 3) * 3


@dataclass(frozen=True)
class TinyLayout:
    """The hyperparameters of a diffusers AutoencoderTiny."""

    family: ClassVar[str] = FAMILY

    in_channels: int
    out_channels: int
    encoder_widths: tuple[int, ...]
    decoder_widths: tuple[int, ...]
    encoder_blocks: tuple[int, ...]
    decoder_blocks: tuple[int, ...]
    latent_channels: int
    act: str = "relu"
    upsample: str = "nearest"
    upsampling: int = 2
    sample_size: int = 512  # config.json has none; SD 1.x's size (TAESD's first partner)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def config(self) -> Config:
        """The aecli config of this layout; training settings for fine-tuning: MSE, Adam 1e-4."""
        return config_from_dict(self.raw_config(), "the VAE's configuration")

    def raw_config(self) -> dict:
        encoder, decoder = self._encoder(), self._decoder()
        return {
            "data": {"image_size": self.sample_size, "channels": self.in_channels, "range": "unit"},
            "model": {
                "encoder": encoder,
                "latent": {
                    "channels": self.latent_channels,
                    "head": False,
                    "scaling_factor": self.scaling_factor,
                    "shift_factor": self.shift_factor,
                },
                "decoder": decoder,
                "output": "none",
            },
            "loss": {"reconstruction": "mse"},
            "optim": {"name": "adam", "lr": 1.0e-4},
            "train": {"epochs": 10, "batch_size": 8},
        }

    def _encoder(self) -> list[dict]:
        """The spec of each module of EncoderTiny.layers, in order."""
        found = []
        levels = zip(self.encoder_widths, self.encoder_blocks, strict=True)
        for level, (width, count) in enumerate(levels):
            found.append(_conv(width, stride=1 if level == 0 else 2, bias=level == 0))
            found += [{"type": "tinyblock", "act": self.act}] * count
        found.append(_conv(self.latent_channels))
        return found

    def _decoder(self) -> list[dict]:
        """The latent clamp's spec, then that of each module of DecoderTiny.layers, in order."""
        found = [
            {"type": "soft_clamp", "magnitude": CLAMP},
            _conv(self.decoder_widths[0]),
            {"type": "act", "fn": self.act},
        ]
        levels = zip(self.decoder_widths, self.decoder_blocks, strict=True)
        for level, (width, count) in enumerate(levels):
            last = level == len(self.decoder_widths) - 1
            found += [{"type": "tinyblock", "act": self.act}] * count
            if not last:
                found.append({"type": "upsample", "factor": self.upsampling, "mode": self.upsample})
            found.append(_conv(self.out_channels if last else width, bias=last))
        return found

    def diffusers_config(self) -> dict:
        """config.json as diffusers writes it for AutoencoderTiny."""
        return {
            "_class_name": FAMILY,
            "act_fn": self.act,
            "block_out_channels": list(self.decoder_widths),
            "decoder_block_out_channels": list(self.decoder_widths),
            "encoder_block_out_channels": list(self.encoder_widths),
            "force_upcast": False,
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "latent_magnitude": 3,
            "latent_shift": 0.5,
            "num_decoder_blocks": list(self.decoder_blocks),
            "num_encoder_blocks": list(self.encoder_blocks),
            "out_channels": self.out_channels,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "upsample_fn": self.upsample,
            "upsampling_scaling_factor": self.upsampling,
        }

    def names(self) -> list[TensorName]:
        """Every tensor of the model under its names: aecli's, diffusers' and (as `ldm`) the
        name in TAESD's own encoder or decoder file (`0.weight`, `1.conv.0.weight`, ...)
        after `encoder.` or `decoder.`."""
        from aecli.models import build_model

        state = build_model(self.config(), meta=True).state_dict()
        found = []
        for key in state:
            where, index, rest = key.split(".", 2)
            if rest.startswith("conv.") and rest.count(".") == 1:  # a ConvBlock's Conv2d
                rest = rest[len("conv.") :]
            # diffusers' DecoderTiny has no module for the clamp, TAESD's Decoder has
            position = int(index) - (1 if where == "decoder" else 0)
            original = f"{where}.{index}.{rest}"  # TAESD's own file for `where`, its key after
            found.append(TensorName(key, f"{where}.layers.{position}.{rest}", original))
        return found


def _conv(out: int, stride: int = 1, bias: bool = True) -> dict:
    spec = {"type": "conv", "out": out, "kernel": 3, "stride": stride, "padding": 1}
    return spec if bias else {**spec, "bias": False}


def layout_from_diffusers_config(raw: dict, path: Path) -> TinyLayout:
    """The layout an AutoencoderTiny config.json describes; anything aecli cannot build, or
    of absurd size, is refused before anything is allocated."""
    try:
        encoder_widths, encoder_blocks = _levels(raw, "encoder", (1, 3, 3, 3))
        decoder_widths, decoder_blocks = _levels(raw, "decoder", (3, 3, 3, 1))
        act = raw.get("act_fn", "relu")
        if act not in ACTIVATIONS:
            raise ValueError(f"act_fn: aecli builds {', '.join(ACTIVATIONS)}, not {str(act)[:40]}")
        upsample = raw.get("upsample_fn", "nearest")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample_fn: aecli builds nearest and bilinear, not {upsample}")
        key = "upsampling_scaling_factor"
        upsampling = whole_number(raw.get(key, 2), key, 1, 8)
        down, up = 2 ** (len(encoder_widths) - 1), upsampling ** (len(decoder_widths) - 1)
        if down != up:
            raise ValueError(
                f"the encoder downsamples {down}x, the decoder upsamples {up}x: no round trip"
            )
        for key in ("latent_magnitude", "latent_shift"):
            finite_number(raw.get(key, 0.0), key)
        scale = raw.get("scaling_factor")
        layout = TinyLayout(
            in_channels=whole_number(raw.get("in_channels", 3), "in_channels", 1, 4),
            out_channels=whole_number(raw.get("out_channels", 3), "out_channels", 1, 4),
            encoder_widths=encoder_widths,
            decoder_widths=decoder_widths,
            encoder_blocks=encoder_blocks,
            decoder_blocks=decoder_blocks,
            latent_channels=whole_number(raw.get("latent_channels", 4), "latent_channels", 1, 1024),
            act=ACTIVATIONS[act],
            upsample=upsample,
            upsampling=upsampling,
            sample_size=sample_size_of(raw.get("sample_size", 512)),
            scaling_factor=finite_number(1.0 if scale is None else scale, "scaling_factor"),
            shift_factor=finite_number(raw.get("shift_factor") or 0.0, "shift_factor"),
        )
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"unusable {FAMILY} config ({first_line(exc)[:200]})", path=path
        ) from None
    # about the parameters (3x3 convolutions), before anything is allocated
    weights = sum(
        9 * w * w * (3 * n + 1)
        for widths, counts in ((encoder_widths, encoder_blocks), (decoder_widths, decoder_blocks))
        for w, n in zip(widths, counts, strict=True)
    )
    if weights > MAX_PARAMETERS:
        raise WeightsError(
            f"an {FAMILY} of about {weights:.2e} parameters; aecli builds at most "
            f"{MAX_PARAMETERS:.1e}",
            path=path,
        )
    return layout


def _levels(raw: dict, part: str, counts: tuple[int, ...]) -> tuple[tuple, tuple]:
    """(widths, blocks per level) of the encoder or decoder, checked."""
    widths_key, blocks_key = f"{part}_block_out_channels", f"num_{part}_blocks"
    widths, blocks = raw.get(widths_key, [64] * len(counts)), raw.get(blocks_key, list(counts))
    for key, value in ((widths_key, widths), (blocks_key, blocks)):
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_LEVELS:
            raise ValueError(f"{key}: a list of 1 to {MAX_LEVELS} numbers")
    if len(widths) != len(blocks):
        raise ValueError(f"{widths_key} and {blocks_key}: one of each per level")
    widths = tuple(whole_number(w, widths_key, 1, MAX_WIDTH) for w in widths)
    blocks = tuple(whole_number(n, blocks_key, 0, MAX_LAYERS) for n in blocks)
    if len(set(widths)) > 1:
        # EncoderTiny / DecoderTiny give each level's first convolution the level's own width
        # as its input: diffusers builds other widths, but cannot run them
        raise ValueError(f"{widths_key}: {FAMILY} runs with one width for every level")
    return widths, blocks


def layout_of_config(config: Config) -> tuple[TinyLayout | None, str]:
    """The AutoencoderTiny layout an aecli config has, or (None, the first thing that
    differs)."""
    model, latent = config.model, config.model.latent
    if not latent.spatial or latent.variational or latent.head:
        return None, (
            f"model.latent: {FAMILY} has a spatial deterministic latent that is the encoder's "
            "output (variational: false, head: false)"
        )
    if model.output != "none" or config.data.range != "unit":
        return None, f"{FAMILY} works on images in [0, 1] (data.range unit, model.output none)"
    encoder = [s for s in model.encoder for _ in range(getattr(s, "repeat", 1))]
    decoder = [s for s in model.decoder for _ in range(getattr(s, "repeat", 1))]
    try:
        encoder_widths, encoder_blocks = _count(encoder[:-1])
        decoder_widths, decoder_blocks = _count(decoder[1:-1])
        blocks = [s for s in encoder + decoder if s.type == "tinyblock"]
        upsamples = [s for s in decoder if s.type == "upsample"]
        layout = TinyLayout(
            in_channels=config.data.channels,
            out_channels=decoder[-1].out,
            encoder_widths=encoder_widths,
            decoder_widths=decoder_widths,
            encoder_blocks=encoder_blocks,
            decoder_blocks=decoder_blocks,
            latent_channels=latent.channels,
            act=blocks[0].act if blocks else decoder[2].fn,
            upsample=upsamples[0].mode if upsamples else "nearest",
            upsampling=upsamples[0].factor if upsamples else 2,
            sample_size=config.data.size[0],
            scaling_factor=latent.scaling_factor,
            shift_factor=latent.shift_factor,
        )
        reference = layout.config().model
    except (AttributeError, IndexError, ConfigError):
        return None, f"model: not the {FAMILY} layout"
    why = layout_mismatch(model, reference, FAMILY)
    return (None, why) if why else (layout, "")


def _count(specs: list) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(width, residual blocks) of each level: a level is a convolution and the residual
    blocks after it (activations and upsamplings between are checked afterwards)."""
    widths: list[int] = []
    blocks: list[int] = []
    for spec in specs:
        if spec.type == "conv":
            widths.append(spec.out)
            blocks.append(0)
        elif spec.type == "tinyblock":
            blocks[-1] += 1
    return tuple(widths), tuple(blocks)


# -- TAESD's own files: taesd_encoder.safetensors and taesd_decoder.safetensors ----------------

# the keys of TAESD's nn.Sequential encoder or decoder: a convolution's, or a Block's
_TAESD_KEY = re.compile(r"(\d+)\.(weight|bias|conv\.[024]\.(?:weight|bias)|skip\.weight)")
HALVES = ("encoder", "decoder")
# TAESD's releases as torch.save files, read through torch.load(weights_only=True)
TORCH_SUFFIXES = (".pth",)


def taesd_half(keys) -> str | None:
    """encoder or decoder, for the keys of one of TAESD's own files (the encoder's first
    module is a convolution, `0.weight`; the decoder's is its clamp, so its first tensor is
    `1.weight`); None for other keys."""
    keys = set(keys)
    if not keys or not all(_TAESD_KEY.fullmatch(k) for k in keys):
        return None
    if "0.weight" in keys:
        return "encoder"
    return "decoder" if "1.weight" in keys else None


def partner(path: Path, half: str) -> Path:
    """The other half's file beside `path`: taesd_encoder.safetensors <-> taesd_decoder..."""
    other = HALVES[1 - HALVES.index(half)]
    return path.with_name(path.name.replace(half, other))


def layout_from_taesd(shapes: dict[str, tuple[int, ...]], path: Path) -> TinyLayout:
    """The layout of TAESD's two files, from their tensor shapes (keys after `encoder.` or
    `decoder.`). TAESD's files carry no factors: scale 1, shift 0, as its pipelines use."""
    encoder = _modules(shapes, "encoder")
    decoder = _modules(shapes, "decoder")
    try:
        # encoder: a convolution opens each level (the first with a bias, the others strided
        # without), residual blocks follow; the last module is the convolution to the latent
        widths, blocks, last = [], [], max(encoder)
        for index in range(last):
            if encoder[index] == "conv":
                widths.append(shapes[f"encoder.{index}.weight"][0])
                blocks.append(0)
            else:
                blocks[-1] += 1
        # decoder: 0 the clamp, 1 a convolution from the latent, 2 its activation, then per
        # level residual blocks, an upsampling and a convolution (the last: to the image)
        out = max(decoder)
        decoder_widths, decoder_blocks = [shapes["decoder.1.weight"][0]], [0]
        for index in range(3, out):
            if decoder.get(index) == "block":
                decoder_blocks[-1] += 1
            elif decoder.get(index) == "conv":
                decoder_widths.append(shapes[f"decoder.{index}.weight"][0])
                decoder_blocks.append(0)
        return TinyLayout(
            in_channels=shapes["encoder.0.weight"][1],
            out_channels=shapes[f"decoder.{out}.weight"][0],
            encoder_widths=tuple(widths),
            decoder_widths=tuple(decoder_widths),
            encoder_blocks=tuple(blocks),
            decoder_blocks=tuple(decoder_blocks),
            latent_channels=shapes[f"encoder.{last}.weight"][0],
        )
    except (KeyError, IndexError, ValueError):
        raise WeightsError(
            f"not a TAESD encoder and decoder pair aecli knows ({FAMILY})", path=path
        ) from None


def _modules(shapes: dict[str, tuple[int, ...]], half: str) -> dict[int, str]:
    """{module index: conv or block} of one of TAESD's files (parameter-free modules absent)."""
    found: dict[int, str] = {}
    for key in shapes:
        role, index, rest = key.split(".", 2)
        if role == half:
            found[int(index)] = "block" if rest.startswith(("conv.", "skip.")) else "conv"
    return found

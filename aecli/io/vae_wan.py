"""The Wan and Qwen-Image VAEs as aecli image models: diffusers `AutoencoderKLWan` (Wan 2.1: 16
latent channels at f8; Wan 2.2: 48 at f16, with a 2x2 patch and residual down and up blocks)
and `AutoencoderKLQwenImage` (Wan 2.1's architecture, fine-tuned for Qwen-Image) folders, read
and written, and the Wan VAE's own single files (Wan 2.1's keys, which ComfyUI-style Qwen-Image
VAE files have too, and Wan 2.2's), read and written.

One description (`WanLayout`) gives the aecli block config (aecli.models.wan's blocks, which
run the video VAE on a single frame exactly as diffusers does on an image, T = 1) and every
tensor's three names: aecli's, diffusers' and the original file's (`ldm`: the inverse of
diffusers' `convert_wan_vae_to_diffusers` for Wan 2.1, the nesting of Wan 2.2's vae2_2.py).

The latent convention is per channel: Qwen-Image's and Wan's pipelines take
(z - latents_mean) * (1 / latents_std), so an imported model keeps latents_mean as
`model.latent.shift_factor` and 1 / latents_std as `scaling_factor` (the `affine` convention).
diffusers' decode clamps its images to [-1, 1]; aecli's images are clamped where they become
pixels, so the decoder ends unclamped (as a fine-tune wants it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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
    whole_number,
)

QWEN, WAN = "AutoencoderKLQwenImage", "AutoencoderKLWan"
RELEASES = {"wan": WAN, "qwen-image": QWEN}  # wan_patch's `release` -> the diffusers class
BLOCK_TYPES = frozenset(
    {
        "wan_patch",
        "wan_unpatch",
        "wan_conv",
        "wan_resblock",
        "wan_attention",
        "wan_norm",
        "wan_resample",
        "wan_down_block",
        "wan_up_block",
    }
)
SAMPLE_SIZE = 256  # config.json has none; a multiple of either factor (8, 16)

# latents_mean and latents_std of the releases, for files that carry none: Wan 2.1's (the
# defaults of both diffusers classes: Qwen-Image kept them) and Wan 2.2's (Wan2.2's vae2_2.py)
WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
KNOWN_STATISTICS = {(16, False): (WAN21_MEAN, WAN21_STD), (48, True): (WAN22_MEAN, WAN22_STD)}


@dataclass(frozen=True)
class WanLayout:
    """The hyperparameters of a diffusers AutoencoderKLWan or AutoencoderKLQwenImage."""

    release: str  # wan (AutoencoderKLWan) or qwen-image (AutoencoderKLQwenImage)
    base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_downsample: tuple[bool, ...]  # one per level but the last (diffusers' spelling)
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    attn_scales: tuple[float, ...] = ()  # written back; none adds attention (diffusers' cannot)
    dropout: float = 0.0
    decoder_base_dim: int | None = None  # Wan 2.2's wider decoder; None: base_dim
    is_residual: bool = False  # Wan 2.2's residual down and up blocks
    channels: int = 3  # the image's (diffusers' in_channels / patch^2)
    patch: int = 1  # Wan 2.2's patch_size 2
    sample_size: int = SAMPLE_SIZE

    @property
    def family(self) -> str:
        return RELEASES[self.release]

    def config(self) -> Config:
        """The aecli config of this layout; training settings as AutoencoderKL's (L1 summed
        + KL 1e-6, Adam (0.5, 0.9))."""
        return config_from_dict(self.raw_config(), "the VAE's configuration")

    def raw_config(self) -> dict:
        return {
            "data": {
                "image_size": self.sample_size,
                "channels": self.channels,
                "range": "symmetric",
            },
            "model": {
                "encoder": [part.spec for part in self._parts("encoder")],
                "latent": {
                    "channels": self.z_dim,
                    "variational": True,
                    "head": False,  # quant_conv is the encoder's last block (a 5-D weight)
                    "scaling_factor": [1 / s for s in self.latents_std],
                    "shift_factor": list(self.latents_mean),
                },
                "decoder": [part.spec for part in self._parts("decoder")],
                "output": "none",
            },
            "loss": {"reconstruction": "l1", "reduction": "sum", "kl_weight": 1.0e-6},
            "optim": {"name": "adam", "lr": 3.6e-5, "betas": [0.5, 0.9]},
            "train": {"epochs": 10, "batch_size": 8},
        }

    def diffusers_config(self) -> dict:
        """config.json as diffusers writes it for the class."""
        common = {
            "_class_name": self.family,
            "attn_scales": list(self.attn_scales),
            "base_dim": self.base_dim,
            "dim_mult": list(self.dim_mult),
            "dropout": self.dropout,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
            "num_res_blocks": self.num_res_blocks,
            "temperal_downsample": list(self.temperal_downsample),
            "z_dim": self.z_dim,
        }
        if self.release == "qwen-image":
            return {**common, "input_channels": self.channels}
        levels, patched = len(self.dim_mult), self.channels * self.patch**2
        return {
            **common,
            "decoder_base_dim": self.decoder_base_dim,
            "in_channels": patched,
            "is_residual": self.is_residual,
            "out_channels": patched,
            "patch_size": None if self.patch == 1 else self.patch,
            "scale_factor_spatial": self.patch * 2 ** (levels - 1),
            "scale_factor_temporal": 2 ** sum(self.temperal_downsample),
        }

    def names(self) -> list[TensorName]:
        """Every tensor of the model under its three names: each block's prefixes (`_parts`)
        and its own suffixes (its `tensor_names`, aecli.models.wan)."""
        from aecli.models import build_model

        model = build_model(self.config(), meta=True)
        parts = {where: self._parts(where) for where in ("encoder", "decoder")}
        found = []
        for key in model.state_dict():
            where, index, rest = key.split(".", 2)
            part = parts[where][int(index)]
            diffusers, original = getattr(model, where)[int(index)].tensor_names(rest)
            found.append(TensorName(key, f"{part.diffusers}.{diffusers}", f"{part.ldm}.{original}"))
        return found

    def _parts(self, where: str) -> list[_Part]:
        """The encoder's or decoder's blocks in order, with their prefixes, as diffusers'
        WanEncoder3d / WanDecoder3d (and the original Wan code) build them."""
        parts: list[_Part] = []

        def add(spec: dict, diffusers: str | None = None, original: str | None = None):
            parts.append(_Part(spec, diffusers, original))

        def middle(width: int):
            mid, orig = f"{where}.mid_block", f"{where}.middle"
            add(_resblock(width, self.dropout), f"{mid}.resnets.0", f"{orig}.0")
            add({"type": "wan_attention"}, f"{mid}.attentions.0", f"{orig}.1")
            add(_resblock(width, self.dropout), f"{mid}.resnets.1", f"{orig}.2")

        def head(out: int):
            add({"type": "wan_norm"}, f"{where}.norm_out", f"{where}.head.0")
            add({"type": "act", "fn": "silu"})
            add(_conv(out), f"{where}.conv_out", f"{where}.head.2")

        levels = len(self.dim_mult)
        if where == "encoder":
            add({"type": "wan_patch", "patch": self.patch, "release": self.release})
            dims = [self.base_dim * u for u in (1, *self.dim_mult)]
            add(_conv(dims[0]), "encoder.conv_in", "encoder.conv1")
            k = 0
            for i, out in enumerate(dims[1:]):
                down, time = i != levels - 1, i != levels - 1 and self.temperal_downsample[i]
                if self.is_residual:
                    spec = {"type": "wan_down_block", "out": out, "blocks": self.num_res_blocks,
                            "down": down, "time": time, "dropout": self.dropout}  # fmt: skip
                    add(spec, f"encoder.down_blocks.{i}", f"encoder.downsamples.{i}")
                    continue
                for _ in range(self.num_res_blocks):
                    add(_resblock(out, self.dropout), *_flat(k))
                    k += 1
                if down:
                    add({"type": "wan_resample", "mode": "down", "time": time}, *_flat(k))
                    k += 1
            middle(dims[-1])
            head(2 * self.z_dim)
            add(_conv(2 * self.z_dim, kernel=1), "quant_conv", "conv1")
            return parts
        add(_conv(self.z_dim, kernel=1), "post_quant_conv", "conv2")
        base = self.decoder_base_dim or self.base_dim
        dims = [base * u for u in (self.dim_mult[-1], *reversed(self.dim_mult))]
        add(_conv(dims[0]), "decoder.conv_in", "decoder.conv1")
        middle(dims[0])
        upsample = tuple(reversed(self.temperal_downsample))
        k = 0
        for i, out in enumerate(dims[1:]):
            up, time = i != levels - 1, i != levels - 1 and upsample[i]
            ours, theirs = f"decoder.up_blocks.{i}", f"decoder.upsamples.{i}"
            if self.is_residual and up:
                spec = {"type": "wan_up_block", "out": out, "blocks": self.num_res_blocks + 1,
                        "time": time, "dropout": self.dropout}  # fmt: skip
                add(spec, ours, theirs)
                continue
            for j in range(self.num_res_blocks + 1):
                original = (
                    f"{theirs}.upsamples.{j}" if self.is_residual else f"decoder.upsamples.{k}"
                )
                add(_resblock(out, self.dropout), f"{ours}.resnets.{j}", original)
                k += 1
            if up:  # Wan 2.1: to half the width (the next level's first block widens it again)
                spec = {"type": "wan_resample", "mode": "up", "time": time, "out": out // 2}
                add(spec, f"{ours}.upsamplers.0", f"decoder.upsamples.{k}")
                k += 1
        head(self.channels * self.patch**2)
        add({"type": "wan_unpatch", "patch": self.patch})
        return parts


@dataclass(frozen=True)
class _Part:
    """One aecli block of a layout: its spec, and the prefixes of its tensors in diffusers'
    names and the original file's (None for blocks without tensors)."""

    spec: dict
    diffusers: str | None
    ldm: str | None


def _flat(k: int) -> tuple[str, str]:
    """Wan 2.1's encoder: one flat list of blocks, numbered alike in both layouts."""
    return f"encoder.down_blocks.{k}", f"encoder.downsamples.{k}"


def _conv(out: int, kernel: int = 3) -> dict:
    return {"type": "wan_conv", "out": out, "kernel": kernel}


def _resblock(out: int, dropout: float) -> dict:
    return {"type": "wan_resblock", "out": out, "dropout": dropout}


# -- diffusers' config.json --------------------------------------------------------------------


def layout_from_diffusers_config(raw: dict, path: Path) -> WanLayout:
    """The layout an AutoencoderKLWan or AutoencoderKLQwenImage config.json describes;
    anything aecli cannot build, or of absurd size, is refused before anything is allocated."""
    family = raw.get("_class_name", WAN)
    qwen = family == QWEN
    try:
        mult = _numbers(raw.get("dim_mult", [1, 2, 4, 4]), "dim_mult", MAX_LEVELS, whole=True)
        base = whole_number(raw.get("base_dim", 96), "base_dim", 1, MAX_WIDTH)
        decoder = None if qwen else raw.get("decoder_base_dim")
        decoder = (
            None if decoder is None else whole_number(decoder, "decoder_base_dim", 1, MAX_WIDTH)
        )
        for width in (base, decoder or base):
            if width * max(mult) > MAX_WIDTH:
                raise ValueError(f"dim_mult: widths past {MAX_WIDTH}")
        z = whole_number(raw.get("z_dim", 16), "z_dim", 1, 1024)
        blocks = whole_number(raw.get("num_res_blocks", 2), "num_res_blocks", 1, MAX_LAYERS)
        time = raw.get("temperal_downsample", [False, True, True])
        if not isinstance(time, list) or not all(isinstance(t, bool) for t in time):
            raise ValueError("temperal_downsample: a list of true and false")
        if len(time) != len(mult) - 1:
            raise ValueError(
                f"temperal_downsample: {len(time)} flags, one per level but the last "
                f"({len(mult) - 1})"
            )
        dropout = finite_number(raw.get("dropout", 0.0), "dropout")
        if not 0 <= dropout < 1:
            raise ValueError("dropout: from 0 to below 1")
        residual = False if qwen else raw.get("is_residual", False)
        if not isinstance(residual, bool):
            raise ValueError("is_residual: true or false")
        attention = _numbers(raw.get("attn_scales", []), "attn_scales", 64)
        if not residual and any(1 / 2**i in attention for i in range(len(mult))):
            # WanEncoder3d / QwenImageEncoder3d build attention there, then call it with the
            # feature cache, which it does not take: no release has any
            raise ValueError("attn_scales: diffusers cannot run attention in the encoder's levels")
        patch = None if qwen else raw.get("patch_size")
        patch = 1 if patch is None else whole_number(patch, "patch_size", 1, 8)
        if qwen:
            channels = whole_number(raw.get("input_channels", 3), "input_channels", 1, 3)
        else:
            given = whole_number(raw.get("in_channels", 3), "in_channels", 1, 3 * 64)
            if whole_number(raw.get("out_channels", 3), "out_channels", 1, 3 * 64) != given:
                raise ValueError("in_channels and out_channels differ: no round trip")
            channels = given // patch**2
            if channels * patch**2 != given:
                raise ValueError(f"in_channels: {given} is not channels x patch_size^2")
        if channels not in (1, 3):
            raise ValueError(f"aecli reads images of 1 or 3 channels, not {channels}")
        mean, std = _statistics(raw, z, residual)
    except (TypeError, ValueError) as exc:
        reason = first_line(exc)[:200]
        raise WeightsError(f"unusable {family} config ({reason})", path=path) from None
    # about the parameters (3x3x3 convolutions dominate), before anything is allocated
    widest = max(base, decoder or base) * max(mult)
    weights = sum(
        27 * (w * u) ** 2 * (4 * blocks + 2) for w in (base, decoder or base) for u in mult
    )
    weights += 8 * 27 * widest**2
    if weights > MAX_PARAMETERS:
        raise WeightsError(
            f"an {family} of about {weights:.2e} parameters; aecli builds at most "
            f"{MAX_PARAMETERS:.1e}",
            path=path,
        )
    return WanLayout(
        release="qwen-image" if qwen else "wan",
        base_dim=base,
        z_dim=z,
        dim_mult=mult,
        num_res_blocks=blocks,
        temperal_downsample=tuple(time),
        latents_mean=mean,
        latents_std=std,
        attn_scales=attention,
        dropout=dropout,
        decoder_base_dim=decoder,
        is_residual=residual,
        channels=channels,
        patch=patch,
    )


def _numbers(value, key: str, most: int, whole: bool = False) -> tuple:
    """A list of up to `most` finite numbers (whole ones from 1 to MAX_WIDTH)."""
    if not isinstance(value, list) or len(value) > most or (whole and not value):
        raise ValueError(f"{key}: a list of {'1' if whole else '0'} to {most} numbers")
    if whole:
        return tuple(whole_number(v, key, 1, MAX_WIDTH) for v in value)
    return tuple(finite_number(v, key) for v in value)


def _statistics(raw: dict, z: int, residual: bool) -> tuple[tuple, tuple]:
    """latents_mean and latents_std: one finite number per latent channel, the std positive;
    the release's where the config has none."""
    known = KNOWN_STATISTICS.get((z, residual), KNOWN_STATISTICS[(16, False)])
    mean = _numbers(raw.get("latents_mean", list(known[0])), "latents_mean", 65536)
    std = _numbers(raw.get("latents_std", list(known[1])), "latents_std", 65536)
    for key, values in (("latents_mean", mean), ("latents_std", std)):
        if len(values) != z:
            raise ValueError(f"{key}: {len(values)} numbers for {z} latent channels (z_dim)")
    if min(std) <= 0:
        raise ValueError("latents_std: the spreads must be positive")
    return mean, std


# -- an aecli config ---------------------------------------------------------------------------


def layout_of_config(config: Config) -> tuple[WanLayout | None, str]:
    """The Wan or Qwen-Image layout an aecli config has (which, its wan_patch block says), or
    (None, the first thing that differs)."""
    model, latent = config.model, config.model.latent
    encoder = [s for s in model.encoder for _ in range(getattr(s, "repeat", 1))]
    decoder = [s for s in model.decoder for _ in range(getattr(s, "repeat", 1))]
    if encoder[0].type != "wan_patch":
        return None, f"model.encoder: {WAN} and {QWEN} begin with a wan_patch block"
    release = encoder[0].release
    family = RELEASES[release]
    if not latent.spatial or not latent.variational or latent.head or latent.statistics:
        return None, (
            f"model.latent: {family} has a spatial variational latent that is the encoder's "
            "output (head: false)"
        )
    if model.output != "none" or config.data.range != "symmetric":
        return (
            None,
            f"{family} works on images in [-1, 1] (data.range symmetric, model.output none)",
        )
    try:
        base = encoder[1].out
        downs = [s for s in encoder if s.type == "wan_down_block"]
        if downs:
            widths = [s.out for s in downs]
            blocks, dropout = downs[0].blocks, downs[0].dropout
            time = [s.time for s in downs[:-1]]
        else:
            widths, blocks, time = _flat_levels(encoder)
            dropout = next(s.dropout for s in encoder if s.type == "wan_resblock")
        mult = tuple(_whole(w, base) for w in widths)
        decoder_base = _whole(decoder[1].out, mult[-1])
        scale, shift = (
            v if isinstance(v, list) else [v] * latent.channels
            for v in (latent.scaling_factor, latent.shift_factor)
        )
        layout = WanLayout(
            release=release,
            base_dim=base,
            z_dim=latent.channels,
            dim_mult=mult,
            num_res_blocks=blocks,
            temperal_downsample=tuple(time),
            latents_mean=tuple(shift),
            latents_std=tuple(_std_of(s) for s in scale),
            dropout=dropout,
            decoder_base_dim=None if decoder_base == base else decoder_base,
            is_residual=bool(downs),
            channels=config.data.channels,
            patch=encoder[0].patch,
            sample_size=config.data.size[0],
        )
        reference = layout.config().model
    except (AttributeError, IndexError, StopIteration, ValueError, ConfigError):
        return None, f"model: not the {family} layout"
    if release == "qwen-image" and (
        layout.is_residual or layout.patch != 1 or decoder_base != base
    ):
        return None, f"model: {QWEN} has no patch, residual blocks or decoder widths of its own"
    why = layout_mismatch(model, reference, family)
    return (None, why) if why else (layout, "")


def qwen_layout_of_config(config: Config) -> tuple[WanLayout | None, str]:
    """The Qwen-Image layout an aecli config has, or (None, why not)."""
    layout, why = layout_of_config(config)
    if layout is not None and layout.release != "qwen-image":
        return None, f"model.encoder.0: a wan_patch of release {layout.release}, not qwen-image"
    return layout, why


def _flat_levels(encoder: list) -> tuple[list[int], int, list[bool]]:
    """(each level's width, residual blocks per level, each downsampling's time flag) of Wan
    2.1's flat encoder: its levels run from the convolution in to the middle (the three blocks
    before its wan_norm), split by the downsamplings."""
    end = next(i for i, s in enumerate(encoder) if s.type == "wan_norm") - 3
    levels: list[list] = [[]]
    time = []
    for spec in encoder[2:end]:
        if spec.type == "wan_resample":
            time.append(spec.time)
            levels.append([])
        else:
            levels[-1].append(spec)
    if any(s.type != "wan_resblock" for level in levels for s in level):
        raise ValueError("a level of residual blocks and other blocks")
    return [level[-1].out for level in levels], len(levels[0]), time


def _whole(width: int, base: int) -> int:
    if width % base:
        raise ValueError(f"{width} is not a multiple of {base}")
    return width // base


def _std_of(scale: float) -> float:
    """latents_std from a scaling_factor of 1 / std: of the numbers whose inverse is it, the
    shortest written (a config's 2.8184, not 2.8184000000000005)."""
    std = 1 / scale
    near = (math.nextafter(std, -math.inf), std, math.nextafter(std, math.inf))
    found = [c for c in near if 1 / c == scale]
    return min(found, key=lambda c: len(repr(c))) if found else std


# -- the Wan VAE's own files -----------------------------------------------------------------

_ORIGINAL = ("encoder.conv1.weight", "decoder.conv1.weight", "decoder.head.0.gamma", "conv2.weight")


def layout_from_original(shapes: dict[str, tuple[int, ...]], path: Path) -> WanLayout | None:
    """The layout of a Wan VAE file in the original code's names (Wan 2.1's, as ComfyUI-style
    Qwen-Image VAE files have them too, or Wan 2.2's), from its tensors' shapes; None for
    other files. Wan 2.1 and Qwen-Image files have the same keys and shapes: the file's name
    says which (`qwen` or `wan` in it); one line asks for it where it says neither. The
    files carry no latent statistics: the release's are taken (Wan 2.1's for 16 channels,
    Wan 2.2's for 48)."""
    if not all(key in shapes for key in _ORIGINAL):
        return None
    residual = "encoder.downsamples.0.downsamples.0.residual.0.gamma" in shapes
    try:
        base, given = shapes["encoder.conv1.weight"][:2]
        z = shapes["conv2.weight"][0]
        widths, blocks, time = (_nested_levels if residual else _original_levels)(shapes)
        mult = tuple(_whole(w, base) for w in widths)
        decoder_base = _whole(shapes["decoder.conv1.weight"][0], mult[-1])
        if len(mult) > MAX_LEVELS or blocks > MAX_LAYERS or not 1 <= z <= 1024:
            raise ValueError("past aecli's limits")
    except (KeyError, IndexError, ValueError):
        raise WeightsError(f"not a Wan VAE file aecli knows ({WAN}, {QWEN})", path=path) from None
    patch = 2 if residual else 1  # Wan 2.2's code patchifies by 2 before its encoder
    if given % patch**2 or given // patch**2 not in (1, 3):
        raise WeightsError(
            f"a Wan VAE file whose encoder takes {given} channels; aecli reads images of 1 or 3",
            path=path,
        )
    mean, std = KNOWN_STATISTICS.get((z, residual), ((0.0,) * z, (1.0,) * z))
    return WanLayout(
        release="wan" if residual else _release_named(path),
        base_dim=base,
        z_dim=z,
        dim_mult=mult,
        num_res_blocks=blocks,
        temperal_downsample=tuple(time),
        latents_mean=mean,
        latents_std=std,
        decoder_base_dim=None if decoder_base == base else decoder_base,
        is_residual=residual,
        channels=given // patch**2,
        patch=patch,
    )


def _release_named(path: Path) -> str:
    """wan or qwen-image, as the file's name says."""
    name = path.name.lower()
    said = [release for release in ("qwen", "wan") if release in name]
    if len(said) != 1:
        raise WeightsError(
            f"a Wan 2.1 ({WAN}) or Qwen-Image ({QWEN}) VAE file: the two have the same keys "
            "and shapes, so aecli goes by the file's name: put qwen or wan in it",
            path=path,
        )
    return "qwen-image" if said[0] == "qwen" else "wan"


def _original_levels(shapes: dict) -> tuple[list[int], int, list[bool]]:
    """(each level's width, residual blocks per level, each downsampling's time flag) of Wan
    2.1's encoder.downsamples.K: residual blocks (`residual.`) and downsamplings (`resample.`),
    one flat list."""
    levels: list[list[int]] = [[]]
    time: list[bool] = []
    k = 0
    while True:
        prefix = f"encoder.downsamples.{k}."
        if prefix + "residual.2.weight" in shapes:
            levels[-1].append(shapes[prefix + "residual.2.weight"][0])
        elif prefix + "resample.1.weight" in shapes:
            time.append(prefix + "time_conv.weight" in shapes)
            levels.append([])
        else:
            break
        k += 1
    if len({len(level) for level in levels}) != 1:
        raise ValueError("levels of different depths")
    return [level[-1] for level in levels], len(levels[0]), time


def _nested_levels(shapes: dict) -> tuple[list[int], int, list[bool]]:
    """The same of Wan 2.2's encoder.downsamples.I.downsamples.J: each level's residual
    blocks, then its downsampling."""
    widths, time, counts = [], [], []
    i = 0
    while f"encoder.downsamples.{i}.downsamples.0.residual.2.weight" in shapes:
        prefix = f"encoder.downsamples.{i}.downsamples."
        j = 0
        while f"{prefix}{j}.residual.2.weight" in shapes:
            j += 1
        widths.append(shapes[f"{prefix}{j - 1}.residual.2.weight"][0])
        counts.append(j)
        if f"{prefix}{j}.resample.1.weight" in shapes:
            time.append(f"{prefix}{j}.time_conv.weight" in shapes)
        i += 1
    if len(set(counts)) != 1:
        raise ValueError("levels of different depths")
    return widths, counts[0], time

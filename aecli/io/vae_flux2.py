"""The FLUX.2 VAE as an aecli model: diffusers `AutoencoderKLFlux2` folders, read and written.

Its encoder and decoder are AutoencoderKL's (`vae_files.KLLayout`, with the decoder's own
widths where `decoder_block_out_channels` is set); what it adds is a `BatchNorm2d` (`bn`, no
affine weights) over the latent in 2x2 patches, which the model never runs: FLUX.2's pipelines
normalise the patchified latent with its running mean and variance. aecli keeps them as the
model's `latent_norm` buffers (config `model.latent.statistics`), so that they travel with the
weights, and the family's latent convention (`vae_families`) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from aecli.config import Config, config_from_dict
from aecli.errors import WeightsError, first_line
from aecli.io import vae_files
from aecli.io.vae_files import KLLayout, TensorName, finite_number, whole_number

FAMILY = "AutoencoderKLFlux2"
# AutoencoderKLFlux2.bn's buffers, under the same names in aecli (after `latent_norm.`),
# diffusers and FLUX.2's own file (after `bn.`)
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# FLUX.2's own file (black-forest-labs/flux2, src/flux2/autoencoder.py: ae.safetensors) names its
# tensors as latent diffusion does, except that the latent's 1x1 convolutions belong to the
# encoder and decoder
ORIGINAL = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}


@dataclass(frozen=True)
class Flux2Layout:
    """The hyperparameters of a diffusers AutoencoderKLFlux2: AutoencoderKL's, and its
    BatchNorm's."""

    family: ClassVar[str] = FAMILY

    kl: KLLayout
    patch: int = 2
    eps: float = 1.0e-4
    momentum: float = 0.1

    def config(self) -> Config:
        """AutoencoderKL's config (`KLLayout.config`) with the latent's statistics."""
        raw = self.kl.raw_config()
        raw["model"]["latent"]["statistics"] = {
            "patch": self.patch,
            "eps": self.eps,
            "momentum": self.momentum,
        }
        return config_from_dict(raw, "the VAE's configuration")

    def diffusers_config(self) -> dict:
        """config.json as diffusers writes it for AutoencoderKLFlux2 (no scaling factors: its
        pipelines use the BatchNorm statistics)."""
        kl = self.kl.diffusers_config()
        for key in ("scaling_factor", "shift_factor", "force_upcast"):
            kl.pop(key)
        decoder = self.kl.decoder_block_out_channels
        return {
            **kl,
            "_class_name": FAMILY,
            "decoder_block_out_channels": None if decoder is None else list(decoder),
            "batch_norm_eps": self.eps,
            "batch_norm_momentum": self.momentum,
            "patch_size": [self.patch, self.patch],
        }

    def names(self) -> list[TensorName]:
        """Every tensor: AutoencoderKL's, then the BatchNorm's buffers; as `ldm`, the name in
        FLUX.2's own file."""
        found = []
        for name in self.kl.names():
            prefix = next((p for p in ORIGINAL if name.ldm.startswith(p)), None)
            if prefix is not None:
                name = replace(name, ldm=ORIGINAL[prefix] + name.ldm[len(prefix) :])
            found.append(name)
        for buffer in STATISTICS:
            found.append(TensorName(f"latent_norm.{buffer}", f"bn.{buffer}", f"bn.{buffer}"))
        return found


def layout_from_diffusers_config(raw: dict, path: Path) -> Flux2Layout:
    """The layout an AutoencoderKLFlux2 config.json describes; anything aecli cannot build, or
    of absurd size, is refused before anything is allocated."""
    try:
        patch = raw.get("patch_size", [2, 2])
        if not isinstance(patch, list) or len(patch) != 2 or patch[0] != patch[1]:
            raise ValueError(f"patch_size: {str(patch)[:40]} is not a square [p, p]")
        patch = whole_number(patch[0], "patch_size", 1, 8)
        eps = finite_number(raw.get("batch_norm_eps", 1.0e-4), "batch_norm_eps")
        momentum = finite_number(raw.get("batch_norm_momentum", 0.1), "batch_norm_momentum")
        if eps <= 0 or not 0 <= momentum <= 1:
            raise ValueError("batch_norm_eps must be positive and batch_norm_momentum in [0, 1]")
        decoder = raw.get("decoder_block_out_channels")
        widths = raw.get("block_out_channels")
        if decoder is not None and (
            not isinstance(decoder, list)
            or not isinstance(widths, list)
            or len(decoder) != len(widths)
        ):
            raise ValueError("decoder_block_out_channels: one width per level")
        decoder = (
            None
            if decoder is None
            else tuple(
                whole_number(w, "decoder_block_out_channels", 1, vae_files.MAX_WIDTH)
                for w in decoder
            )
        )
    except (TypeError, ValueError) as exc:
        reason = first_line(exc)[:200]
        raise WeightsError(f"unusable {FAMILY} config ({reason})", path=path) from None
    # the rest is AutoencoderKL's config, checked there (its messages name AutoencoderKL)
    kl_raw = {**raw, "_class_name": "AutoencoderKL", "scaling_factor": 1.0, "shift_factor": 0.0}
    try:
        kl = vae_files.layout_from_diffusers_config(kl_raw, path)
    except WeightsError as exc:
        raise WeightsError(exc.message.replace("AutoencoderKL", FAMILY), path=path) from None
    if decoder is not None and min(decoder) < kl.norm_groups:
        raise WeightsError(
            f"unusable {FAMILY} config (decoder_block_out_channels: a width below "
            f"norm_num_groups {kl.norm_groups})",
            path=path,
        )
    kl = KLLayout(**{**kl.__dict__, "decoder_block_out_channels": decoder})
    return Flux2Layout(kl, patch, eps, momentum)


def layout_of_config(config: Config) -> tuple[Flux2Layout | None, str]:
    """The AutoencoderKLFlux2 layout an aecli config has, or (None, the first thing that
    differs)."""
    stats = config.model.latent.statistics
    if stats is None:
        return None, f"model.latent: {FAMILY} keeps BatchNorm statistics (latent.statistics)"
    latent = config.model.latent.model_copy(update={"statistics": None})
    plain = config.model_copy(update={"model": config.model.model_copy(update={"latent": latent})})
    kl, why = vae_files.layout_of_config(plain, decoder_widths=True)
    if kl is None:
        return None, why.replace("AutoencoderKL", FAMILY)
    return Flux2Layout(kl, stats.patch, stats.eps, stats.momentum), ""


def layout_from_original(shapes: dict[str, tuple[int, ...]], path: Path) -> Flux2Layout | None:
    """The layout of FLUX.2's own VAE file (latent diffusion's names, the latent's 1x1
    convolutions inside the encoder and decoder, and `bn.*`: the BatchNorm over the 2x2-patched
    latent, eps 1e-4 and momentum 0.1 as FLUX.2's AutoEncoder sets them), from its tensors'
    shapes; None for a file that is not one."""
    if "bn.running_mean" not in shapes or vae_files.naming_of(shapes) != "ldm":
        return None
    renamed = dict(shapes)
    for plain, inside in ORIGINAL.items():
        for param in ("weight", "bias"):
            if inside + param in renamed:
                renamed[plain + param] = renamed.pop(inside + param)
    kl = vae_files.layout_from_shapes(renamed, "ldm", path)
    # the decoder's own widths (FLUX.2's smaller decoder): each level's last residual block's
    decoder = []
    for level in range(len(kl.block_out_channels)):
        key = f"decoder.up.{level}.block.{kl.layers_per_block}.conv2.weight"
        decoder.append(shapes.get(key, (0,))[0])
    smaller = None if tuple(decoder) == kl.block_out_channels else tuple(decoder)
    kl = KLLayout(
        **{
            **kl.__dict__,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
            "decoder_block_out_channels": smaller,
        }
    )
    channels = shapes["bn.running_mean"]
    if len(channels) != 1 or channels[0] != 4 * kl.latent_channels:
        raise WeightsError(
            f"tensor bn.running_mean has shape {list(channels)}, FLUX.2's VAE ({FAMILY}) needs "
            f"[{4 * kl.latent_channels}] (its {kl.latent_channels}-channel latent in 2x2 patches)",
            path=path,
        )
    return Flux2Layout(kl)

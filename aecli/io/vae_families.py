"""The diffusion VAE families aecli reads and writes, one entry each: the diffusers class, its
layout (the aecli block config and every tensor's names), whether it is deterministic, and its
latent convention (how that family's diffusion pipelines take its latents: what `--scaled`
writes and `decode --scaled` undoes). Commands ask here; none branches on a family.

A new family is one `Family` entry and its layout module (as `vae_tiny`, `vae_flux2`). A
convention that is not one scale and shift is a `Convention` kind whose `scaling` reads its
statistics from the model: `batchnorm` for FLUX.2's 2x2 patchify and BatchNorm statistics;
Qwen-Image and Wan's per-channel mean and std fit the same `LatentScaling` (per-channel factors,
patch 1). A convention's `fit` sets those values from a latent folder's statistics (`aecli export
--latent-stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from aecli.config import Config, LatentConfig
from aecli.errors import UsageError, WeightsError
from aecli.io import vae_dc, vae_files, vae_flux2, vae_hunyuan, vae_tiny, vae_wan
from aecli.io.latents import LatentScaling


class Layout(Protocol):
    family: str

    def config(self) -> Config: ...

    def diffusers_config(self) -> dict: ...

    def names(self) -> list[vae_files.TensorName]: ...


@dataclass(frozen=True)
class Convention:
    """How a family's pipelines take its latents. kind `affine`: (z - shift) * scale with the
    factors the model carries (model.latent.scaling_factor / shift_factor, from config.json);
    kind `batchnorm`: (patchify(z) - running_mean) / sqrt(running_var + eps) per channel of
    the patchified latent, from the BatchNorm statistics the model holds (`latent_norm`,
    config model.latent.statistics: FLUX.2)."""

    kind: str
    pipelines: str  # what the family's pipelines do, in words, for `aecli info`
    # why the factors are not statistics of the family's own latents, where they are not (the
    # TAESD family's are those of the VAE whose latents it shares): `export --latent-stats`
    # refuses with it
    fixed: str = ""

    def scaling(
        self, latent: LatentConfig, state: Mapping[str, torch.Tensor] | None = None
    ) -> LatentScaling:
        """The scaling `--scaled` applies, from the model's config and its tensors (`state`,
        aecli's names: a state dict, or the tensors of a weights file)."""
        stats = latent.statistics
        if self.kind != "batchnorm" or stats is None or state is None:
            return LatentScaling(
                *(
                    tuple(f) if isinstance(f, list) else f
                    for f in (latent.scaling_factor, latent.shift_factor)
                )
            )
        # as FLUX.2's pipelines: std = sqrt(running_var + eps), in float64 here
        mean = state["latent_norm.running_mean"].detach().to("cpu", torch.float64)
        var = state["latent_norm.running_var"].detach().to("cpu", torch.float64)
        scale = 1 / torch.sqrt(var + stats.eps)
        return LatentScaling(tuple(scale.tolist()), tuple(mean.tolist()), stats.patch)

    def fit(
        self, latent: LatentConfig, stats: Mapping[str, torch.Tensor]
    ) -> tuple[LatentConfig, dict[str, torch.Tensor], dict[str, float | list[float]]]:
        """What makes this convention normalise latents of these statistics
        (`aecli.stats.folder_statistics` of raw latents; in the convention's patches for
        batchnorm; the spread of posterior draws where given): (the latent config, the tensors
        to set under aecli's names, {what the family's files call a value: the value}).

        affine: where the model has a factor per channel (Qwen-Image, Wan), latents_mean and
        latents_std per channel; else one scaling factor, 1 / std over all values (Stable
        Diffusion's: latent diffusion set `scale_factor = 1. / z.flatten().std()`, which
        diffusers documents as the latents' standard deviation), and, where the model has a
        shift (SD3, FLUX.1), the mean as shift_factor. batchnorm: the running mean and variance
        per channel of the patchified latent (FLUX.2)."""
        mean = stats["mean"]
        std = stats.get("draw_std", stats["std"])
        if self.kind == "batchnorm":
            _check(mean, std, positive=False)  # a variance of 0 is fine: pipelines add eps
            var = std.square()
            tensors = {"running_mean": mean, "running_var": var}
            return (
                latent,
                {f"latent_norm.{k}": v.float() for k, v in tensors.items()},
                {f"bn.{k}": v.tolist() for k, v in tensors.items()},
            )
        if isinstance(latent.scaling_factor, list) or isinstance(latent.shift_factor, list):
            _check(mean, std)
            update = {"scaling_factor": (1 / std).tolist(), "shift_factor": mean.tolist()}
            written = {"latents_mean": mean.tolist(), "latents_std": std.tolist()}
            return latent.model_copy(update=update), {}, written
        mean = stats["overall_mean"]
        std = stats.get("overall_draw_std", stats["overall_std"])
        _check(mean[None], std[None])
        written = {"scaling_factor": 1 / float(std)}
        if latent.shift_factor != 0.0:
            written["shift_factor"] = float(mean)
        return latent.model_copy(update=written), {}, written

    def describe(
        self, latent: LatentConfig, state: Mapping[str, torch.Tensor] | None = None
    ) -> str:
        if self.kind == "batchnorm" and state is None:
            return self.pipelines
        return f"{self.scaling(latent, state).describe()}: {self.pipelines}"


def _check(mean: torch.Tensor, std: torch.Tensor, positive: bool = True) -> None:
    """Statistics a convention can be set to: finite, and spreads that 1 / std can scale."""
    if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise UsageError("--latent-stats: the latents' statistics are not finite (an overflow?)")
    flat = torch.nonzero(std <= 0).flatten() if positive else []
    if len(flat):
        where = f"channel {int(flat[0])}" if len(std) > 1 else "every channel"
        raise UsageError(
            f"--latent-stats: the latents of {where} do not vary (standard deviation 0): no "
            "scaling factor normalises them"
        )


@dataclass(frozen=True)
class Family:
    name: str  # the diffusers class
    models: str  # the releases it holds, for messages
    deterministic: bool  # an encoder that gives one latent per image (no posterior)
    convention: Convention
    read_config: Callable[[dict, Path], Layout]  # config.json -> layout, checked
    of_config: Callable[[Config], tuple[Layout | None, str]]  # aecli config -> layout or why not
    block_types: frozenset[str]  # block types only this family has
    single_file: bool  # export --format single-file writes its released single-file layout
    # a released single file, told from its tensors' names and shapes alone (no config.json):
    # (shapes) -> its layout, whose TensorName.ldm are the file's keys; None: not this family's
    read_original: Callable[[dict[str, tuple[int, ...]], Path], Layout | None] | None = None


FAMILIES: dict[str, Family] = {
    "AutoencoderKL": Family(
        "AutoencoderKL",
        "the SD 1.x / 2.x, SDXL, SD3 and FLUX.1 VAE",
        deterministic=False,
        convention=Convention(
            "affine", "diffusers' SD / SDXL / SD3 / FLUX.1 pipelines scale (and shift) so"
        ),
        read_config=vae_files.layout_from_diffusers_config,
        of_config=vae_files.layout_of_config,
        block_types=frozenset(),  # its blocks are aecli's own (cat-kl-f8)
        single_file=True,
    ),
    "AutoencoderTiny": Family(
        "AutoencoderTiny",
        "TAESD, TAESDXL, TAESD3, TAEF1",
        deterministic=True,
        convention=Convention(
            "affine",
            "TAESD-family pipelines take latents at scale 1",
            fixed="its factors are those of the VAE whose latents it shares (SD's, SDXL's, "
            "SD3's, FLUX.1's), not statistics of its own: give that VAE the statistics",
        ),
        read_config=vae_tiny.layout_from_diffusers_config,
        of_config=vae_tiny.layout_of_config,
        block_types=frozenset({"tinyblock", "soft_clamp"}),
        single_file=False,
    ),
    "AutoencoderKLFlux2": Family(
        "AutoencoderKLFlux2",
        "the FLUX.2 VAE",
        deterministic=False,
        convention=Convention(
            "batchnorm",
            "FLUX.2 pipelines normalise the 2x2-patchified latent with its BatchNorm's running "
            "mean and sqrt(running_var + eps) so",
        ),
        read_config=vae_flux2.layout_from_diffusers_config,
        of_config=vae_flux2.layout_of_config,
        block_types=frozenset(),  # AutoencoderKL's blocks; its statistics tell it apart
        single_file=True,  # FLUX.2's own ae.safetensors layout
        read_original=vae_flux2.layout_from_original,
    ),
    # -- AutoencoderDC (DC-AE, SANA): aecli.io.vae_dc
    "AutoencoderDC": Family(
        "AutoencoderDC",
        "DC-AE: the SANA VAE, dc-ae-f32c32 / f64c128 / f128c512",
        deterministic=True,
        convention=Convention("affine", "SANA pipelines multiply by the scaling factor so"),
        read_config=vae_dc.layout_from_diffusers_config,
        of_config=vae_dc.layout_of_config,
        block_types=vae_dc.BLOCK_TYPES,
        single_file=True,  # DC-AE's original checkpoint layout (mit-han-lab/dc-ae-*)
        read_original=vae_dc.layout_from_original,
    ),
    # -- AutoencoderKLQwenImage and AutoencoderKLWan: aecli.io.vae_wan
    "AutoencoderKLQwenImage": Family(
        "AutoencoderKLQwenImage",
        "the Qwen-Image VAE",
        deterministic=False,
        convention=Convention(
            "affine",
            "Qwen-Image pipelines take (z - latents_mean) / latents_std per channel so",
        ),
        read_config=vae_wan.layout_from_diffusers_config,
        of_config=vae_wan.qwen_layout_of_config,
        # Wan 2.1's blocks (its wan_patch block's release tells it apart): export finds
        # AutoencoderKLWan by them, whose layout_of_config gives Qwen-Image's layout too
        block_types=frozenset(),
        single_file=True,  # the Wan VAE's own keys, as ComfyUI's Qwen-Image VAE file has them
    ),
    "AutoencoderKLWan": Family(
        "AutoencoderKLWan",
        "the Wan 2.1 and 2.2 VAEs",
        deterministic=False,
        convention=Convention(
            "affine", "Wan pipelines take (z - latents_mean) / latents_std per channel so"
        ),
        read_config=vae_wan.layout_from_diffusers_config,
        of_config=vae_wan.layout_of_config,
        block_types=vae_wan.BLOCK_TYPES,
        single_file=True,  # the Wan VAE's own keys (Wan 2.1's, or Wan 2.2's)
        # Wan 2.1's, Wan 2.2's and Qwen-Image's files (the file's name tells the last apart)
        read_original=vae_wan.layout_from_original,
    ),
    # -- AutoencoderKLHunyuanImage: aecli.io.vae_hunyuan
    "AutoencoderKLHunyuanImage": Family(
        "AutoencoderKLHunyuanImage",
        "the HunyuanImage 2.1 VAE",
        deterministic=False,
        convention=Convention("affine", "HunyuanImage 2.1 pipelines scale so"),
        read_config=vae_hunyuan.layout_from_diffusers_config,
        of_config=vae_hunyuan.layout_of_config,
        block_types=vae_hunyuan.BLOCK_TYPES,
        single_file=True,  # the original keys, as ComfyUI reads them
        read_original=vae_hunyuan.layout_from_original,
    ),
}

# aecli's own models: the factors in their config (1 and 0 unless set)
OWN = Convention("affine", "aecli's own latent factors")


def listing() -> str:
    return ", ".join(f"{f.name} ({f.models})" for f in FAMILIES.values())


def layout_from_diffusers_config(raw: dict, path: Path) -> Layout:
    """The layout a diffusers config.json describes, in the family its `_class_name` names;
    another class is one line listing the families aecli reads."""
    name = raw.get("_class_name", "AutoencoderKL")
    family = FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        raise WeightsError(f"a diffusers {str(name)[:60]}; aecli reads {listing()}", path=path)
    return family.read_config(raw, path)


def layout_of_original(shapes: dict[str, tuple[int, ...]], path: Path) -> Layout | None:
    """The layout of a released single file of a family that has its own key layout (DC-AE's,
    the Wan / Qwen-Image VAE's), from its tensors' shapes; None where no family knows it."""
    for family in FAMILIES.values():
        if family.read_original is not None:
            layout = family.read_original(shapes, path)
            if layout is not None:
                return layout
    return None


def family_of(config: Config) -> tuple[Family | None, Layout | None]:
    """The family whose layout an aecli config has (an imported VAE, or one fine-tuned from
    it), with that layout; (None, None) for other models."""
    for family in FAMILIES.values():
        layout, _ = family.of_config(config)
        if layout is not None:
            return family, layout
    return None, None


def layout_for_export(config: Config) -> tuple[Family, Layout | None, str]:
    """(the family a config is meant as, its layout or None, why not): a config with a block
    type only one family has is taken as that family, one with latent statistics as FLUX.2's;
    others as AutoencoderKL."""
    types = {spec.type for spec in [*config.model.encoder, *config.model.decoder]}
    default = "AutoencoderKL" if config.model.latent.statistics is None else "AutoencoderKLFlux2"
    family = next((f for f in FAMILIES.values() if f.block_types & types), FAMILIES[default])
    layout, why = family.of_config(config)
    return family, layout, why


def convention_of(config: Config) -> Convention:
    family, _ = family_of(config)
    return OWN if family is None else family.convention

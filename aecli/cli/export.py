"""`aecli export`: a model as a diffusers VAE folder (AutoencoderKL, AutoencoderTiny,
AutoencoderKLFlux2), a single-file VAE, or aecli weights; with `--latent-stats DIR/`, its latent
normalisation set from a latent folder's statistics."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.options import Json, Overwrite, Weights
from aecli.cli.render import console, print_json, shown

EXAMPLES = """
[bold]Examples[/bold]

  aecli export runs/kl/model.safetensors -o my-vae/ --format diffusers
  aecli export my-vae/ -o my-vae.safetensors --format single-file
  aecli export sd-vae-ft-mse/ -o sd-vae.safetensors --format aecli
  aecli export runs/kl/model.safetensors --latent-stats in1k/ -o my-vae/
"""


class ExportFormat(str, Enum):
    diffusers = "diffusers"
    single_file = "single-file"
    aecli = "aecli"


def export(
    weights: Weights,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="A folder for --format diffusers; a .safetensors file for single-file and aecli.",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            metavar="diffusers|single-file|aecli",
            help="diffusers: config.json + diffusion_pytorch_model.safetensors, what "
            "AutoencoderKL.from_pretrained (AutoencoderTiny for the TAESD family, "
            "AutoencoderKLFlux2 for FLUX.2) reads; "
            "single-file: one .safetensors in the "
            "latent-diffusion key layout (what image-generation front ends load); aecli: aecli "
            "weights with the config inside.",
        ),
    ] = ExportFormat.diffusers,
    latent_stats: Annotated[
        Path | None,
        typer.Option(
            "--latent-stats",
            metavar="PATH",
            help="A latent folder of these weights' latents (`aecli encode WEIGHTS IMAGES -o "
            "DIR/`): their statistics become the exported model's latent normalisation, as its "
            "family keeps it: scaling_factor = 1 / std (and shift_factor = mean where the model "
            "shifts: SD3, FLUX.1); latents_mean and latents_std per channel (Qwen-Image, Wan); "
            "the BatchNorm's running mean and variance over 2x2 patches (FLUX.2); the statistics "
            "`aecli sample` draws from (aecli's own models). A folder of --scaled latents is "
            "unscaled first; with --store moments, the spread of posterior draws is used.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="With --latent-stats: use a latent folder that other weights wrote."
        ),
    ] = False,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Write a model in another format. diffusers and single-file take models with the
    AutoencoderKL layout (cat-kl-f8, or any VAE aecli imported), diffusers also the
    AutoencoderTiny (TAESD) and AutoencoderKLFlux2 (FLUX.2) layouts; others are refused with
    the first block that does not fit."""
    from aecli.errors import UsageError
    from aecli.io.atomic import atomic_write_bytes
    from aecli.io.outputs import OutputGuard
    from aecli.io.weights import load_weights, save_weights

    if force and latent_stats is None:
        raise UsageError("--force: uses a latent folder of other weights; add --latent-stats DIR/")
    model, info = load_weights(weights)
    _check_format(fmt, out, info.config, weights, latent_stats is not None)
    config, sample_stats, fitted = info.config, info.latent_stats, None
    if latent_stats is not None:
        config, sample_stats, fitted = _fit(model, info, weights, latent_stats, force)
    files = _files(model, config, fmt, out)
    folder = out if fmt is ExportFormat.diffusers else None
    reads = [weights] if latent_stats is None else [weights, latent_stats]
    OutputGuard(reads).check("-o", list(files), overwrite=overwrite, out_dir=folder)
    for path, data in files.items():
        if data is None:
            save_weights(
                path,
                model,
                config,
                preset=info.preset,
                data=info.data,
                class_names=info.class_names,
                metrics=info.metrics,
                latent_stats=sample_stats,
            )
        else:
            atomic_write_bytes(path, data)
    console.print(f"exported {shown(weights)} -> {shown(out)} ({fmt.value})")
    if fitted is not None:
        console.print(f"latent statistics of {shown(latent_stats)}: {shown(fitted['described'])}")
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "out": str(out),
                "format": fmt.value,
                "files": [str(p) for p in files],
                "latent_stats": fitted,
            }
        )


def _check_format(fmt: ExportFormat, out: Path, config, weights: Path, stats: bool) -> None:
    """Whether the model has a layout --format writes (the first block that does not fit, if
    not), and -o the kind of name it writes; `stats`: --latent-stats given."""
    from aecli.errors import UsageError
    from aecli.io.vae_families import layout_for_export

    if fmt is ExportFormat.aecli:
        if out.suffix != ".safetensors":
            raise UsageError(f"-o {out}: --format aecli writes one .safetensors file")
        return
    family, layout, why = layout_for_export(config)
    single = fmt is ExportFormat.single_file
    if layout is None:
        raise UsageError(f"--format {fmt.value}: not an {family.name}: {why}", path=weights)
    if single and not family.single_file:
        raise UsageError(
            f"--format single-file: aecli writes {family.name} ({family.models}) as a "
            "diffusers folder only (--format diffusers)",
            path=weights,
        )
    if single and out.suffix != ".safetensors":
        raise UsageError(f"-o {out}: --format single-file writes one .safetensors file")
    if stats and single and family.convention.kind == "affine":
        raise UsageError(
            f"--latent-stats: a single file has no config.json, where {family.name} keeps "
            "its latent factors; export --format diffusers or aecli"
        )


def _files(model, config, fmt: ExportFormat, out: Path) -> dict[Path, bytes | None]:
    """What the export writes: each file's bytes (None: aecli weights, written with the config
    and the facts of the run)."""
    from aecli.io.vae_families import layout_for_export
    from aecli.io.vae_files import export_files

    if fmt is ExportFormat.aecli:
        return {out: None}
    _, layout, _ = layout_for_export(config)
    written = export_files(model.state_dict(), layout, fmt.value)
    return {out / name if name else out: data for name, data in written.items()}


def _fit(model, info, weights: Path, folder_path: Path, force: bool) -> tuple:
    """A latent folder's statistics where the model's family keeps its latent normalisation
    (`Convention.fit`: the config's factors, or tensors, set in `model`), or for aecli's own
    models the statistics `aecli sample` reads: (config, latent_stats, what was written)."""
    from aecli.cli.render import print_warning, progress_bar
    from aecli.errors import UsageError
    from aecli.io.latent_folder import LatentFolder
    from aecli.io.vae_families import family_of
    from aecli.stats import folder_statistics, sample_statistics, unscaled_shape

    option = f"--latent-stats {folder_path}"
    folder = LatentFolder.open(folder_path)
    if folder.fingerprint != info.fingerprint and not force:
        raise UsageError(
            f"{option}: latents of other weights (fingerprint {folder.fingerprint or 'unknown'}; "
            f"{weights} has {info.fingerprint}); add --force to use them all the same"
        )
    family, _ = family_of(info.config)
    latent = info.config.model.latent
    if family is not None and family.convention.fixed:
        raise UsageError(f"{option}: {family.name} ({family.models}): {family.convention.fixed}")
    state = model.state_dict()
    patch = 1 if family is None else family.convention.scaling(latent, state).patch
    width = model.latent_shape[0]
    for shape in folder.shapes:
        shape = unscaled_shape(shape, folder.scaling)
        if len(shape) != len(model.latent_shape) or shape[0] != width:
            kind = f"{width} channels" if latent.spatial else f"{width} dimensions"
            raise UsageError(
                f"{option}: latents of {'x'.join(map(str, shape))}; this model's have {kind}"
            )
    classes = info.class_names if family is None else None
    with progress_bar(folder.count, "reading") as advance:
        stats = folder_statistics(
            folder,
            patch=patch,
            unscale=True,
            covariance=family is None,
            class_names=classes,
            progress=advance,
        )
    draws = "draw_std" in stats and family is not None  # aecli's own: as training, the means
    spread = "posterior draws" if draws else "the folder's latents"
    spread += "" if folder.scaling is None else ", their scaling undone"
    record = {"folder": str(folder_path), "images": int(stats["images"]), "std_of": spread}
    if family is None:
        sample_stats = sample_statistics(stats)
        if classes and "class_mean" not in sample_stats:
            print_warning(
                f"{option}: its latents have no labels of this model's classes, so the exported "
                "statistics have none per class (`aecli sample --class` needs them)"
            )
        record["written"] = {k: v.tolist() for k, v in sample_stats.items()}
        what = "mean and covariance" + (", per class too" if "class_mean" in sample_stats else "")
        record["described"] = (
            f"{what} of {int(stats['values']):,} latent values per "
            f"{'channel' if latent.spatial else 'dimension'}, for `aecli sample`"
        )
        return info.config, sample_stats, record
    fitted, tensors, written = family.convention.fit(latent, stats)
    if tensors:
        model.load_state_dict(tensors, strict=False, assign=True)
    config = info.config.model_copy(
        update={"model": info.config.model.model_copy(update={"latent": fitted})}
    )
    record["written"] = written
    record["described"] = (
        f"{_values(written)} (from the mean and std of {spread}, {record['images']:,} images)"
    )
    return config, info.latent_stats, record


def _values(written: dict) -> str:
    """`scaling_factor 0.18215, shift_factor 0`; `latents_std 16 from 0.91 to 2.3`"""
    parts = []
    for name, value in written.items():
        if isinstance(value, list):
            parts.append(f"{name} {len(value)} from {min(value):.4g} to {max(value):.4g}")
        else:
            parts.append(f"{name} {value:.6g}")
    return ", ".join(parts)

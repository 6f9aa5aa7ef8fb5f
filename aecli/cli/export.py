"""`aecli export`: a model as a diffusers VAE folder (AutoencoderKL, AutoencoderTiny,
AutoencoderKLFlux2), a single-file VAE, or aecli weights."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.app import app, guarded
from aecli.cli.options import Json, Overwrite, Weights
from aecli.cli.render import console, print_json, shown

EXAMPLES = """
[bold]Examples[/bold]

  aecli export runs/kl/model.safetensors -o my-vae/ --format diffusers
  aecli export my-vae/ -o my-vae.safetensors --format single-file
  aecli export sd-vae-ft-mse/ -o sd-vae.safetensors --format aecli
"""


class ExportFormat(str, Enum):
    diffusers = "diffusers"
    single_file = "single-file"
    aecli = "aecli"


@app.command(epilog=EXAMPLES)
@guarded
def export(
    weights: Weights,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="A folder for --format diffusers; a .safetensors file for single-file and aecli.",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="diffusers: config.json + diffusion_pytorch_model.safetensors, what "
            "AutoencoderKL.from_pretrained (AutoencoderTiny for the TAESD family, "
            "AutoencoderKLFlux2 for FLUX.2) reads; "
            "single-file: one .safetensors in the "
            "latent-diffusion key layout (what image-generation front ends load); aecli: aecli "
            "weights with the config inside.",
        ),
    ] = ExportFormat.diffusers,
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
    from aecli.io.vae_families import layout_for_export
    from aecli.io.vae_files import export_files
    from aecli.io.weights import load_weights, save_weights

    model, info = load_weights(weights)
    state = model.state_dict()
    if fmt is ExportFormat.aecli:
        if out.suffix != ".safetensors":
            raise UsageError(f"-o {out}: --format aecli writes one .safetensors file")
        files = {out: None}
    else:
        family, layout, why = layout_for_export(info.config)
        if layout is None:
            raise UsageError(f"--format {fmt.value}: not an {family.name}: {why}", path=weights)
        if fmt is ExportFormat.single_file and not family.single_file:
            raise UsageError(
                f"--format single-file: aecli writes {family.name} ({family.models}) as a "
                "diffusers folder only (--format diffusers)",
                path=weights,
            )
        if fmt is ExportFormat.single_file and out.suffix != ".safetensors":
            raise UsageError(f"-o {out}: --format single-file writes one .safetensors file")
        written = export_files(state, layout, fmt.value)
        files = {out / name if name else out: data for name, data in written.items()}
    folder = out if fmt is ExportFormat.diffusers else None
    OutputGuard([weights]).check("-o", list(files), overwrite=overwrite, out_dir=folder)
    for path, data in files.items():
        if data is None:
            save_weights(
                path,
                model,
                info.config,
                preset=info.preset,
                data=info.data,
                class_names=info.class_names,
                metrics=info.metrics,
                latent_stats=info.latent_stats,
            )
        else:
            atomic_write_bytes(path, data)
    console.print(f"exported {shown(weights)} -> {shown(out)} ({fmt.value})")
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "out": str(out),
                "format": fmt.value,
                "files": [str(p) for p in files],
            }
        )

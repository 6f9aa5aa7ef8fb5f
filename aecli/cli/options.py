"""Arguments and options shared by the commands that use a trained model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from aecli.errors import UsageError


def seed_value(value: int | None) -> int | None:
    """A seed: any whole number a random generator takes, 0 to 2^64 - 1 (not printed as a
    range in --help: 20 digits help nobody)."""
    if value is not None and not 0 <= value < 2**64:
        raise typer.BadParameter(f"{value}: a seed is a whole number from 0 to 2^64 - 1")
    return value


def complete_preset(incomplete: str) -> list[str]:
    """Shell completion for a PRESET: the bundled names, then YAML files and folders."""
    from aecli.config import DEFAULT_ALIAS, list_presets

    names = [p.name for p in list_presets()] + [DEFAULT_ALIAS]
    found = sorted(n for n in names if n.startswith(incomplete))
    try:
        paths = sorted(Path(incomplete).parent.glob(Path(incomplete).name + "*"))
    except (OSError, ValueError):
        paths = []
    return found + [
        f"{p}/" if p.is_dir() else str(p)
        for p in paths
        if p.is_dir() or p.suffix in (".yaml", ".yml")
    ]


Weights = Annotated[
    Path,
    typer.Argument(
        help="A weights file written by `aecli train` (the run's model.safetensors), a diffusers "
        "VAE folder of any family aecli reads (Stable Diffusion, SDXL, SD3, FLUX.1 and FLUX.2, "
        "TAESD, DC-AE, Qwen-Image, Wan, HunyuanImage; or a pipeline folder with vae/), or a "
        "VAE's single file (.safetensors, or TAESD's .pth).",
        metavar="WEIGHTS",
        show_default=False,
    ),
]
Inputs = Annotated[
    list[Path],
    typer.Argument(
        help="Image files and folders (searched recursively; PNG, JPEG, WebP, GIF, BMP, TIFF).",
        metavar="INPUTS",
        show_default=False,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="Where to run: auto (CUDA when present), cpu, cuda or cuda:N.",
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        metavar="N",
        help="Images per batch on the device (default: 32; on CUDA, for models of a fixed input "
        "size, as many as fit in a quarter of the free GPU memory, up to 512).",
        show_default=False,
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        metavar="N",
        help="Processes decoding image files in parallel with the model "
        "(default: one per CPU core but one, up to 32; 0 decodes in the main process).",
        show_default=False,
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace output files that already exist.")
]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]

Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="FMT",
        help="safetensors (the latent file, with labels and the model's fingerprint) or npy "
        "(the array alone). Default: npy for a .npy file name, else safetensors (also for -).",
        show_default=False,
    ),
]
Columns = Annotated[
    int,
    typer.Option("--columns", min=1, metavar="N", help="Images per row when -o is a .png grid."),
]

ScalingFactor = Annotated[
    float | None,
    typer.Option(
        "--scaling-factor",
        metavar="X",
        help="The scale of --scaled latents (default: the model's, e.g. 0.18215 for SD 1.x; "
        "0.13025 for an SDXL single file). Implies --scaled.",
        show_default=False,
    ),
]
ShiftFactor = Annotated[
    float | None,
    typer.Option(
        "--shift-factor",
        metavar="X",
        help="The shift of --scaled latents (default: the model's; FLUX 0.1159, SD3 0.0609). "
        "Implies --scaled.",
        show_default=False,
    ),
]

Tile = Annotated[
    int | None,
    typer.Option(
        "--tile",
        min=0,
        metavar="N",
        help="Fully convolutional models: work in tiles of N x N pixels (e.g. 512), so "
        "that device memory follows the tile, not the image; the result is the untiled one. "
        "--batch-size then counts tiles. Default: tiles only for an image that would not fit "
        "in the device's free memory; 0: never.",
        show_default=False,
    ),
]
NoTile = Annotated[
    bool,
    typer.Option(
        "--no-tile",
        help="Never tile: refuse an image that would not fit in the device's free memory "
        "(as --tile 0).",
    ),
]
TileFast = Annotated[
    bool,
    typer.Option(
        "--tile-fast",
        help="Approximate tiles, faster: GroupNorm statistics estimated on a shrunk copy of "
        "the image, attention within each tile, neighbours blended over --tile-overlap.",
    ),
]
TileOverlap = Annotated[
    int | None,
    typer.Option(
        "--tile-overlap",
        min=0,
        metavar="N",
        help="With --tile-fast: pixels neighbouring tiles share (default: a quarter of --tile).",
        show_default=False,
    ),
]


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """`HxW` (or one number for a square) -> (H, W)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match or int(match[1]) == 0 or (match[2] and int(match[2]) == 0):
        raise UsageError(f"{option} {text}: not a size; give HxW (e.g. 64x96) or one number")
    h = int(match[1])
    return h, int(match[2] or h)

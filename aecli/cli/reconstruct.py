"""`aecli reconstruct`: files and folders through a trained model, into PNGs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.options import (
    BatchSize,
    Device,
    Inputs,
    Json,
    NoTile,
    Overwrite,
    Tile,
    TileFast,
    TileOverlap,
    Weights,
    Workers,
)
from aecli.cli.render import (
    console,
    failure_rows,
    metrics_table,
    print_failures,
    print_json,
    progress_bar,
    shown,
)

EXAMPLES = """
[bold]Examples[/bold]

  aecli reconstruct runs/demo/model.safetensors photos/ -o recon/
  aecli reconstruct model.safetensors a.jpg b.png -o out/ --grid sheet.png
  aecli reconstruct model.safetensors photos/ --metrics --json > metrics.json
  aecli reconstruct sd-vae-ft-mse/ big-photos/ -o recon/ --tile 512
"""

METRICS = ["mse", "psnr", "ssim"]
TABLE_ROWS = 20


def reconstruct(
    weights: Weights,
    inputs: Inputs,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="Folder for the reconstructions: one PNG per input, relative paths kept; it "
            "must not be inside an input folder. A name ending in .png writes the one input's "
            "reconstruction to that file.",
            show_default=False,
        ),
    ] = None,
    grid: Annotated[
        Path | None,
        typer.Option(
            "--grid",
            metavar="PATH",
            help="Also write a PNG sheet of the first images over their reconstructions.",
            show_default=False,
        ),
    ] = None,
    grid_count: Annotated[
        int,
        typer.Option(
            "--grid-count", min=1, metavar="N", help="How many images the --grid sheet shows."
        ),
    ] = 16,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics",
            help="Measure MSE, PSNR and SSIM per image and overall, against the image the model "
            "saw (resized to its input for vector-latent models).",
        ),
    ] = False,
    keep_size: Annotated[
        bool,
        typer.Option(
            "--keep-size",
            help="Resize each reconstruction back to its input's size (vector-latent models; "
            "fully convolutional models always keep it).",
        ),
    ] = False,
    tile: Tile = None,
    no_tile: NoTile = False,
    tile_fast: TileFast = False,
    tile_overlap: TileOverlap = None,
    overwrite: Overwrite = False,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Reconstruct image files and folders with a trained model, into PNGs.

    Folders are searched recursively and their relative paths kept under --out. Vector-latent
    models see each image resized to their input size; fully convolutional models (spatial
    latents) work at each image's own size. Unreadable files are named with the reason and
    skipped; the exit status is then 1. Inputs are never modified.
    """
    from aecli.errors import UsageError
    from aecli.inference import Predictor, collect_inputs, reconstruct_files
    from aecli.inference.outputs import is_grid, reconstruction_outputs
    from aecli.io.images import save_png
    from aecli.io.outputs import OutputGuard

    if out is None and grid is None and not metrics:
        raise UsageError("nothing to do: give -o DIR, --grid FILE or --metrics")
    predictor = Predictor(weights, device)
    batch_size = predictor.batch_size(batch_size)
    predictor.set_tiling(tile, tile_overlap, batch_size, fast=tile_fast, never=no_tile)
    files, failures = collect_inputs(inputs)
    outputs = reconstruction_outputs(out, files, len(files) + len(failures))
    one_file = out is not None and is_grid(out)  # -o x.png: one image file, as everywhere
    guard = OutputGuard([weights, *inputs], [f.path for f in files])
    guard.check("-o", outputs or [], overwrite=overwrite, out_dir=None if one_file else out)
    if grid is not None:
        guard.check("--grid", [grid], overwrite=overwrite)
    start = time.perf_counter()
    with progress_bar(len(files), "reconstructing") as advance:
        result = reconstruct_files(
            predictor,
            files,
            outputs,
            keep_size=keep_size,
            metrics=metrics,
            grid_count=grid_count if grid is not None else 0,
            batch_size=batch_size,
            workers=workers,
            progress=advance,
        )
    seconds = time.perf_counter() - start
    failures += result.failures
    if grid is not None and result.grid is not None:
        save_png(grid, result.grid)
    _print_result(result, failures, seconds, predictor.device, weights, out, grid, as_json)
    if failures:
        raise typer.Exit(1)


def _print_result(result, failures, seconds, device, weights, out, grid, as_json) -> None:
    """What `reconstruct` reports: failures, the metrics table, a summary line, and --json."""
    print_failures(failures)
    if result.overall:  # measured (--metrics), over at least one image
        first = result.rows[:TABLE_ROWS]
        title = "Reconstruction quality" + (
            f" (first {TABLE_ROWS} of {len(result.rows)}; all with --json)"
            if len(result.rows) > TABLE_ROWS
            else ""
        )
        console.print(metrics_table(title, first, METRICS, result.overall))
    done = len(result.rows)
    where = f" -> {shown(out)}" if out is not None else ""
    sheet = grid if grid is not None and result.grid is not None else None
    console.print(
        f"reconstructed {done} image{'s' * (done != 1)}{where} in {seconds:.1f} s "
        f"({_rate(done / max(seconds, 1e-9))} img/s) on {device}"
        + (f"; [red]{len(failures)} failed[/red]" if failures else "")
        + (f"; grid -> {shown(sheet)}" if sheet is not None else "")
    )
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "out": None if out is None else str(out),
                "grid": None if sheet is None else str(sheet),
                "images": done,
                "failed": failure_rows(failures),
                "seconds": round(seconds, 3),
                "overall": result.overall,
                "rows": result.rows,
            }
        )


def _rate(per_second: float) -> str:
    """Whole images per second, or two significant digits below 10 (a large model on a CPU)."""
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.2g}"

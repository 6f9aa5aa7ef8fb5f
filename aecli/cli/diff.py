"""`aecli diff`: where a model fails, worst images first; or which of two models does better."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.options import BatchSize, Device, Inputs, Json, Overwrite, Weights, Workers
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

  aecli diff model.safetensors photos/ -o worst.png --top 12
  aecli diff model.safetensors photos/ --json | jq '.rows[:5]'
  aecli diff runs/a/model.safetensors photos/ --vs runs/b -o a-vs-b.png
"""


def diff(
    weights: Weights,
    inputs: Inputs,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="The PNG sheet to write: per image the original, reconstruction, signed error "
            "(blue: too dark, red: too bright) and absolute-error heatmap, worst first.",
            show_default=False,
        ),
    ] = None,
    top: Annotated[
        int,
        typer.Option(
            "--top",
            min=1,
            metavar="N",
            help="How many of the worst images the sheet and table show.",
        ),
    ] = 8,
    vs: Annotated[
        Path | None,
        typer.Option(
            "--vs",
            metavar="PATH",
            help="A second weights file to compare on the same images: both errors per image, "
            "which model wins, the mean difference.",
            show_default=False,
        ),
    ] = None,
    overwrite: Overwrite = False,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Show where a model fails: per-image MSE, PSNR and SSIM, worst images first.

    Errors are measured against the image the model saw (resized to its input for vector-latent
    models). The --json rows hold every image, worst first (highest MSE), with the keys file,
    mse, psnr and ssim (and vs_mse, vs_psnr, vs_ssim, winner with --vs).
    """
    from aecli.inference import Predictor, collect_inputs, diff_files
    from aecli.io.images import save_png
    from aecli.io.outputs import OutputGuard

    predictor = Predictor(weights, device)
    batch_size = predictor.batch_size(batch_size)
    other = Predictor(vs, predictor.device) if vs is not None else None
    files, failures = collect_inputs(inputs)
    if out is not None:
        reads = [weights, *([vs] if vs is not None else []), *inputs]
        guard = OutputGuard(reads, [f.path for f in files])
        guard.check("-o", [out], overwrite=overwrite)
    start = time.perf_counter()
    with progress_bar(len(files), "measuring") as advance:
        result = diff_files(
            predictor,
            files,
            vs=other,
            top=top,
            batch_size=batch_size,
            workers=workers,
            progress=advance,
        )
    seconds = time.perf_counter() - start
    failures += result.failures
    if out is not None and result.sheet is not None:
        save_png(out, result.sheet)

    _print_diff(result, failures, seconds, weights, vs, out, top, as_json)
    if failures:
        raise typer.Exit(1)


def _print_diff(result, failures, seconds, weights, vs, out, top, as_json) -> None:
    """What `diff` reports: failures, the worst images' table, who wins (--vs), a summary
    line, and --json."""
    print_failures(failures)
    columns = ["mse", "psnr", "ssim"]
    if vs is not None:
        columns = ["mse", "vs_mse", "psnr", "vs_psnr", "ssim", "vs_ssim", "winner"]
    overall = dict(result.overall)
    if result.vs_overall:
        overall.update({f"vs_{k}": v for k, v in result.vs_overall.items()})
    worst = result.rows[:top]
    title = f"Worst {len(worst)} of {len(result.rows)} images (by MSE of {shown(weights)})"
    if result.rows:
        console.print(metrics_table(title, worst, columns, overall))
    summary = {
        "weights": str(weights),
        "vs": None if vs is None else str(vs),
        "out": None if out is None or result.sheet is None else str(out),
        "images": len(result.rows),
        "failed": failure_rows(failures),
        "seconds": round(seconds, 3),
        "overall": result.overall,
        "error_scale": result.error_scale,
    }
    if vs is not None and result.rows:
        wins = {k: sum(r["winner"] == k for r in result.rows) for k in ("weights", "vs", "tie")}
        difference = {k: result.vs_overall[k] - result.overall[k] for k in ("mse", "psnr", "ssim")}
        summary.update(vs_overall=result.vs_overall, wins=wins, mean_difference=difference)
        console.print(
            f"{shown(vs)} is better on {wins['vs']} of {len(result.rows)} images, "
            f"{shown(weights)} on {wins['weights']}"
            + (f" ({wins['tie']} ties)" if wins["tie"] else "")
            + f"; mean PSNR difference (vs - weights) {difference['psnr']:+.2f} dB, "
            f"SSIM {difference['ssim']:+.4f}"
        )
    where = f"; sheet -> {shown(out)}" if summary["out"] else ""
    console.print(
        f"measured {len(result.rows)} images in {seconds:.1f} s{where}"
        + (f"; [red]{len(failures)} failed[/red]" if failures else "")
    )
    if as_json:
        print_json({**summary, "rows": result.rows})

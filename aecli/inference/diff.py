"""`diff_files`: per-image errors of one model or two, worst first, and a sheet of the worst."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aecli.data.images import Failure
from aecli.errors import UsageError
from aecli.inference.inputs import InputFile, Progress, load_batches, no_progress
from aecli.inference.outputs import hwc
from aecli.inference.predictor import Predictor
from aecli.inference.reconstruct import image_metrics, summarize_metrics
from aecli.io.images import compose_sheet, diverging, heatmap


@dataclass
class Diff:
    rows: list[dict]  # per image, worst first: file, mse, psnr, ssim (+ vs_* and winner)
    failures: list[Failure]
    sheet: np.ndarray | None
    overall: dict[str, float]
    vs_overall: dict[str, float] | None = None
    error_scale: float = 0.0


def diff_files(
    predictor: Predictor,
    files: list[InputFile],
    *,
    vs: Predictor | None = None,
    top: int = 8,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = no_progress,
) -> Diff:
    """Per-image errors of one model (or two, `vs`), worst first by the first model's MSE, and a
    sheet of the `top` worst: original, reconstruction(s) and error maps side by side."""
    if vs is not None:
        _check_comparable(predictor, vs)
    size = None if predictor.fully_convolutional else predictor.size
    rows: list[dict] = []
    failures: dict[int, Failure] = {}
    worst: list[tuple[float, int, dict]] = []  # a min-heap of the `top` largest MSEs
    models = [predictor] if vs is None else [predictor, vs]
    for batch in load_batches(
        files,
        predictor.channels,
        size,
        batch_size,
        workers,
        failures=failures,
        progress=progress,
        pin_memory=predictor.execution.pins_memory,
        smallest=max(m.smallest_side for m in models),
    ):
        recons = [m.reconstruct(batch.images) for m in models]
        originals = batch.images.to(recons[0].device)
        scores = [{k: v.tolist() for k, v in image_metrics(originals, r).items()} for r in recons]
        recons_cpu = [r.cpu() for r in recons]
        for j, index in enumerate(batch.indices):
            row = {"file": str(files[index].path), **{k: v[j] for k, v in scores[0].items()}}
            if vs is not None:
                row.update({f"vs_{k}": v[j] for k, v in scores[1].items()})
                row["winner"] = _winner(row["mse"], row["vs_mse"])
            rows.append(row)
            key = (row["mse"], -index)
            if top > 0 and (len(worst) < top or key > worst[0][:2]):
                images = {
                    "original": batch.images[j].clone(),
                    "recons": [r[j].clone() for r in recons_cpu],
                }
                entry = (*key, {"row": row, **images})
                if len(worst) < top:
                    heapq.heappush(worst, entry)
                else:
                    heapq.heapreplace(worst, entry)
        progress(len(batch))
    rows.sort(key=lambda r: (-r["mse"], r["file"]))
    shown = [entry[2] for entry in sorted(worst, key=lambda e: (-e[0], -e[1]))]
    sheet, scale = _diff_sheet(shown, vs is not None) if shown else (None, 0.0)
    vs_overall = None
    if vs is not None:
        vs_overall = {
            k: float(np.mean([r[f"vs_{k}"] for r in rows])) if rows else 0.0
            for k in ("mse", "psnr", "ssim")
        }
    failed = [failures[i] for i in sorted(failures)]
    return Diff(rows, failed, sheet, summarize_metrics(rows), vs_overall, scale)


def _winner(a: float, b: float) -> str:
    if np.isclose(a, b, rtol=1e-6, atol=1e-12):
        return "tie"
    return "weights" if a < b else "vs"


def _check_comparable(a: Predictor, b: Predictor) -> None:
    if a.channels != b.channels:
        raise UsageError(
            f"--vs: {b.name} takes {b.channels}-channel images, {a.name} takes {a.channels}; "
            "diff compares two models on the same images"
        )
    if a.fully_convolutional != b.fully_convolutional or (
        not a.fully_convolutional and a.size != b.size
    ):
        raise UsageError(
            f"--vs: {b.name} takes images of {b.accepts}, {a.name} of {a.accepts}; "
            "diff compares two models on the same inputs"
        )


def _diff_sheet(shown: list[dict], versus: bool) -> tuple[np.ndarray, float]:
    """Rows of original, reconstruction, signed error (channel mean; blue darker, red brighter)
    and absolute error (channel mean), one colour scale for the whole sheet."""
    errors = [
        [(r.float() - s["original"].float()).mean(dim=0) / 255.0 for r in s["recons"]]
        for s in shown
    ]
    magnitudes = torch.cat([e.abs().flatten() for row in errors for e in row])
    # The 99.5th percentile, so that a few extreme pixels do not wash out the rest.
    scale = max(float(torch.quantile(magnitudes[:1_000_000], 0.995)), 1.0 / 255.0)
    rows, captions = [], []
    for item, errs in zip(shown, errors, strict=True):
        row = item["row"]
        cells = [hwc(item["original"])] + [hwc(r) for r in item["recons"]]
        if versus:
            cells += [heatmap((e.abs() / scale).numpy()) for e in errs]
            captions.append(
                f"{Path(row['file']).name}   {row['psnr']:.2f} dB vs {row['vs_psnr']:.2f} dB"
            )
        else:
            cells += [
                diverging((errs[0] / scale).numpy()),
                heatmap((errs[0].abs() / scale).numpy()),
            ]
            captions.append(
                f"{Path(row['file']).name}   PSNR {row['psnr']:.2f} dB   SSIM {row['ssim']:.3f}"
            )
        rows.append(cells)
    header = sheet_header(versus, scale)
    return compose_sheet(rows, min_tile=SHEET_TILE, header=header, captions=captions), scale


SHEET_TILE = 128  # the narrowest column of a diff sheet, in pixels: its header fits in it


def sheet_header(versus: bool, scale: float) -> list[str]:
    """The sheet's column labels: for --vs, each model's reconstruction and its |error| named
    by the option that gave it (weights, vs)."""
    if versus:
        return ["original", "weights", "vs", f"|error| weights 0-{scale:.2f}",
                f"|error| vs 0-{scale:.2f}"]  # fmt: skip
    return ["original", "reconstruction", f"signed error ±{scale:.2f}", f"|error| 0-{scale:.2f}"]

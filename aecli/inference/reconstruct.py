"""`reconstruct_files`: every file through the model into PNGs, with quality metrics and a sheet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aecli.data.images import Failure, fit_image
from aecli.inference.inputs import ImageBatch, InputFile, Progress, load_batches, no_progress
from aecli.inference.outputs import PngWriter, hwc
from aecli.inference.predictor import Predictor
from aecli.io.images import compose_sheet
from aecli.losses import mse_per_image, psnr_from_mse, ssim


def image_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR (dB) and SSIM of uint8 (B, C, H, W) images, on [0, 1] values."""
    a, b = original.float() / 255.0, reconstruction.float() / 255.0
    mse = mse_per_image(b, a)
    return {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": ssim(b, a, reduction="none")}


def summarize_metrics(rows: list[dict]) -> dict[str, float]:
    """Means over images of each metric."""
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in ("mse", "psnr", "ssim")}


@dataclass
class Reconstruction:
    rows: list[dict]  # per image, input order: file, output, and mse / psnr / ssim if measured
    failures: list[Failure]
    grid: np.ndarray | None = None
    overall: dict[str, float] = field(default_factory=dict)


def reconstruct_files(
    predictor: Predictor,
    files: list[InputFile],
    outputs: list[Path] | None,
    *,
    keep_size: bool = False,
    metrics: bool = False,
    grid_count: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = no_progress,
) -> Reconstruction:
    """Reconstruct every file (writing outputs[i] for files[i] when outputs are given).

    Vector-latent models see each image resized to their input size (`keep_size` resizes the
    reconstruction back); fully convolutional models work at each image's own size. Metrics
    compare the reconstruction with the image the model saw, as 8-bit values.
    """
    size = None if predictor.fully_convolutional else predictor.size
    rows: dict[int, dict] = {}
    failures: dict[int, Failure] = {}
    grid: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    batches = load_batches(
        files,
        predictor.channels,
        size,
        predictor.images_per_batch(batch_size),
        workers,
        failures=failures,
        progress=progress,
        pin_memory=predictor.execution.pins_memory,
        original_sizes=keep_size,
        smallest=predictor.smallest_side,
    )

    def launch(batch: ImageBatch) -> tuple:
        """Start a batch on the device; its results come to the host while the next runs."""
        images = predictor.execution.to_device(batch.images)  # once, for model and scores
        recon = predictor.reconstruct(images)
        scores = image_metrics(images, recon) if metrics else {}
        copies, wait = predictor.execution.to_host([recon, *scores.values()])
        return batch, copies[0], dict(zip(scores, copies[1:], strict=True)), wait

    def finish(batch: ImageBatch, recon: torch.Tensor, scores: dict, wait) -> None:
        wait()
        scores = {k: v.tolist() for k, v in scores.items()}
        for j, index in enumerate(batch.indices):
            image = hwc(recon[j])
            if keep_size and image.shape[:2] != batch.original_sizes[j]:
                image = fit_image(image, batch.original_sizes[j], "stretch")
            row = {"file": str(files[index].path)}
            if outputs is not None:
                writer.save(outputs[index], image)
                row["output"] = str(outputs[index])
            row.update({k: v[j] for k, v in scores.items()})
            rows[index] = row
            if index < grid_count:
                grid[index] = (hwc(batch.images[j]), hwc(recon[j]))
        progress(len(batch))

    with PngWriter() as writer:
        in_flight = None  # one batch behind: the device never waits for the host's writing
        for batch in batches:
            launched = launch(batch)
            if in_flight is not None:
                finish(*in_flight)
            in_flight = launched
        if in_flight is not None:
            finish(*in_flight)
    ordered = [rows[i] for i in sorted(rows)]
    result = Reconstruction(ordered, [failures[i] for i in sorted(failures)])
    if grid:
        result.grid = originals_over_reconstructions([grid[i] for i in sorted(grid)])
    if metrics:
        result.overall = summarize_metrics(ordered)
    return result


def originals_over_reconstructions(
    pairs: list[tuple[np.ndarray, np.ndarray]], columns: int = 8
) -> np.ndarray:
    """A sheet of rows of up to `columns` originals, each over its reconstructions."""
    rows: list[list[np.ndarray]] = []
    for start in range(0, len(pairs), columns):
        chunk = pairs[start : start + columns]
        rows += [[a for a, _ in chunk], [b for _, b in chunk]]
    return compose_sheet(rows)

"""`encode_files` (files into one latent file) and `decoded_images` (latents back to images)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from aecli.data.images import Failure
from aecli.data.sources import folder_labels
from aecli.errors import UsageError
from aecli.inference.inputs import InputFile, Progress, load_batches, no_progress
from aecli.inference.outputs import hwc
from aecli.inference.predictor import Predictor
from aecli.io.latents import LatentFile, LatentScaling


def encode_files(
    predictor: Predictor,
    files: list[InputFile],
    *,
    size: tuple[int, int] | None | str = "model",
    sample: bool = False,
    seed: int = 0,
    scaling: LatentScaling | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = no_progress,
) -> tuple[LatentFile, list[Failure]]:
    """Encode files into one latent file, each resized to `size` ("model": the model's input
    size; None: each image's own size, for fully convolutional models, all images alike).

    Labels come from subfolder names when every file sits in a subfolder of an input folder
    (as for training), numbered by the weights' class names when they cover them all.
    `scaling` writes the latents as diffusion models consume them, and records it.
    """
    size = predictor.size if size == "model" else size
    generator = predictor.generator(seed) if sample else None
    latents: dict[int, torch.Tensor] = {}
    failures: dict[int, Failure] = {}
    first: tuple[int, tuple] | None = None  # the first batch's file and image size
    for batch in load_batches(
        files,
        predictor.channels,
        size,
        predictor.images_per_batch(batch_size),
        workers,
        failures=failures,
        progress=progress,
        pin_memory=predictor.execution.pins_memory,
    ):
        shape = tuple(batch.images.shape[-2:])
        if first is None:
            first = (batch.indices[0], shape)
        elif shape != first[1]:
            a, b = files[first[0]].path, files[batch.indices[0]].path
            raise UsageError(
                f"{a} is {'x'.join(map(str, first[1]))} but {b} is "
                f"{'x'.join(map(str, shape))}: one latent "
                "file holds latents of one size; encode them separately or pass --size"
            )
        z = predictor.encode(batch.images, generator)
        z = (scaling.apply(z) if scaling is not None else z).cpu()
        latents.update(zip(batch.indices, z, strict=True))
        progress(len(batch))
    order = sorted(latents)
    if not order:
        return LatentFile(torch.empty(0)), [failures[i] for i in sorted(failures)]
    kept = [files[i] for i in order]
    labels, class_names = folder_labels([Path(f.name) for f in kept], predictor.info.class_names)
    result = LatentFile(
        torch.stack([latents[i] for i in order]),
        None if labels is None else torch.tensor(labels, dtype=torch.int64),
        predictor.fingerprint,
        [f.name for f in kept],
        class_names,
        scaling=scaling,
    )
    return result, [failures[i] for i in sorted(failures)]


def decoded_images(
    predictor: Predictor,
    latents: torch.Tensor,
    *,
    batch_size: int = 32,
    progress: Progress = no_progress,
) -> Iterator[np.ndarray]:
    """uint8 (H, W, C) images for (N, *latent_shape) latents, decoded a batch at a time."""
    for start in range(0, len(latents), batch_size):
        for image in predictor.decode(latents[start : start + batch_size]).cpu():
            yield hwc(image)
            progress(1)

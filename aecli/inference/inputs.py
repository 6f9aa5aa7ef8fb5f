"""Input image files: finding them, and decoding them in DataLoader workers (through the one safe
image reader) into batches of one size each; a file that cannot be read becomes a Failure."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from aecli.data.dataset import default_workers
from aecli.data.images import (
    IMAGE_SUFFIXES,
    Failure,
    ImageReadError,
    fit_image,
    fit_picture,
    list_images,
    read_image,
)
from aecli.errors import UsageError

Progress = Callable[[int], None]


def no_progress(_: int) -> None:
    pass


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # relative to the input folder it was found in (the file name for a file)


def collect_inputs(inputs: list[Path]) -> tuple[list[InputFile], list[Failure]]:
    """The image files that INPUT arguments name (folders recursively), in a stable order."""
    files: list[InputFile] = []
    failures: list[Failure] = []
    for given in inputs:
        if not given.exists() and not given.is_symlink():
            raise UsageError("input does not exist", path=given)
        if given.is_dir():
            found, problems = list_images([given])
            files += [InputFile(file, file.relative_to(given).as_posix()) for _, file in found]
            failures += problems
        else:
            files.append(InputFile(given, given.name))
    if not files and not failures:
        raise UsageError(
            f"no image files found in {', '.join(map(str, inputs))} "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files, failures


@dataclass
class ImageBatch:
    indices: list[int]
    images: torch.Tensor  # uint8 (B, C, H, W)
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.indices)

    def __add__(self, other: ImageBatch) -> ImageBatch:
        """Both batches' images in one, in pinned memory where both are pinned."""
        pinned = self.images.is_pinned() and other.images.is_pinned()
        shape = (len(self) + len(other), *self.images.shape[1:])
        out = torch.empty(shape, dtype=self.images.dtype, pin_memory=pinned)
        return ImageBatch(
            self.indices + other.indices,
            torch.cat([self.images, other.images], out=out),
            self.original_sizes + other.original_sizes,
        )

    def pin_memory(self) -> ImageBatch:
        """The batch in pinned memory (the DataLoader's pinning thread calls this)."""
        return ImageBatch(self.indices, self.images.pin_memory(), self.original_sizes)

    def split(self, n: int) -> tuple[ImageBatch, ImageBatch]:
        """The first n images, and the rest."""
        head = ImageBatch(self.indices[:n], self.images[:n], self.original_sizes[:n])
        return head, ImageBatch(self.indices[n:], self.images[n:], self.original_sizes[n:])


def too_small(height: int, width: int, least: int) -> str | None:
    """Why an image of height x width is too small for a model whose smallest side is `least`
    (Predictor.smallest_side), or None."""
    if min(height, width) >= least:
        return None
    return f"too small for this model ({height}x{width}; at least {least}x{least})"


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) pixels -> uint8 (C, H, W), sharing memory where it can."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)


class Buckets:
    """Aspect buckets (`encode --buckets`): each picture is resized to cover the bucket nearest
    to its aspect ratio, then centre-cropped to it, as diffusion trainers bucket their data."""

    def __init__(self, sizes: list[tuple[int, int]]):
        self.sizes = sizes
        self._aspects = [math.log(w / h) for h, w in sizes]

    def nearest(self, height: int, width: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is nearest (in log ratio; the first on a tie)."""
        aspect = math.log(width / height)
        distances = [abs(aspect - a) for a in self._aspects]
        return self.sizes[distances.index(min(distances))]

    def __call__(self, picture: Image.Image) -> Image.Image:
        return fit_picture(picture, self.nearest(picture.height, picture.width), "crop")

    @property
    def largest_side(self) -> int:
        return max(max(size) for size in self.sizes)


def bucket_preset(area_side: int, factor: int) -> list[tuple[int, int]]:
    """`--buckets N`: sizes HxW of about N x N pixels, sides multiples of an eighth of N (and
    of the model's downsampling `factor`), aspect ratios up to 5:2 either way."""
    step = max(factor, area_side // 8 // factor * factor)
    wide = []
    for height in range(step, area_side + 1, step):
        width = area_side * area_side // height // step * step
        if width >= height and 2 * width <= 5 * height:
            wide.append((height, width))
    tall = [(w, h) for h, w in reversed(wide) if h != w]
    return wide + tall


class _ImageFiles(Dataset):
    """Decodes one file per item (in a worker): uint8 (C, H, W), resized when `size` is set, or
    to the nearest of the `buckets`; at its own size, a failure where a side is under
    `smallest`."""

    def __init__(
        self,
        files: list[InputFile],
        channels: int,
        size: tuple[int, int] | None,
        reduced_decode: bool = True,
        buckets: Buckets | None = None,
        smallest: int = 1,
    ):
        self.files, self.channels, self.size, self.buckets = files, channels, size, buckets
        self.smallest = smallest
        # JPEGs that will be resized down anyway can decode at 1/2, 1/4 or 1/8 scale
        target = buckets.largest_side if buckets else max(size) if size is not None else None
        self.at_least = target if reduced_decode else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            array = read_image(
                self.files[index].path, self.channels, at_least=self.at_least, fit=self.buckets
            )
        except ImageReadError as exc:
            return index, Failure(exc.path, exc.reason), None
        original = array.shape[:2]
        if self.size is None and self.buckets is None:
            reason = too_small(*original, self.smallest)
            if reason is not None:
                return index, Failure(str(self.files[index].path), reason), None
        elif self.buckets is None:
            array = fit_image(array, self.size, "stretch")
        return index, image_tensor(array), original


def _group_by_shape(items):
    """Collate: stack same-sized images (one tensor per size), pass failures through."""
    groups: dict[tuple, list] = {}
    failures = []
    for index, image, original in items:
        if isinstance(image, Failure):
            failures.append((index, image))
        else:
            groups.setdefault(tuple(image.shape), []).append((index, image, original))
    stacked = [
        ImageBatch(
            [i for i, _, _ in group],
            torch.stack([image for _, image, _ in group]),
            [tuple(o) for _, _, o in group],
        )
        for group in groups.values()
    ]
    return stacked, failures


# Files a worker decodes per task: batches of the model's size are put together from these, so
# that a large --batch-size still spreads a few thousand files over every worker.
LOADER_CHUNK = 32


def load_batches(
    files: list[InputFile],
    channels: int,
    size: tuple[int, int] | None,
    batch_size: int,
    workers: int | None = None,
    *,
    failures: dict[int, Failure],
    progress: Progress = no_progress,
    original_sizes: bool = False,
    pin_memory: bool = False,
    groups: list[range] | None = None,
    buckets: Buckets | None = None,
    smallest: int = 1,
) -> Iterator[ImageBatch]:
    """Decoded images in batches of one size each (`size` None keeps native sizes; `buckets`
    fits each image to its aspect bucket), in pinned memory with `pin_memory` (pinned by the
    DataLoader's thread, beside the main one, for copies to a GPU that do not block the host).

    `groups` (ranges of file numbers; default: every file) say which files to read, in order; a
    batch never mixes two groups, so a group's batches are the same wherever it is read.
    Files that cannot be read go into `failures` by number (and count as done for `progress`),
    as do images at their own size (`size` None) with a side under `smallest`.
    `original_sizes` makes each batch's `original_sizes` exact (no reduced-scale JPEG decoding).
    """
    groups = [range(len(files))] if groups is None else groups
    count = sum(len(g) for g in groups)
    workers = default_workers(math.ceil(count / batch_size)) if workers is None else workers
    chunk = min(batch_size, LOADER_CHUNK) if workers else batch_size
    chunks = [list(g[i : i + chunk]) for g in groups for i in range(0, len(g), chunk)]
    ends = {g[-1] for g in groups if len(g)}
    loader = DataLoader(
        _ImageFiles(files, channels, size, not original_sizes, buckets, smallest),
        batch_sampler=chunks,
        num_workers=workers,
        collate_fn=_group_by_shape,
        prefetch_factor=4 if workers else None,
        pin_memory=pin_memory,
    )
    pending: dict[tuple, ImageBatch] = {}  # per image size, fewer than batch_size images
    for (found, failed), numbers in zip(loader, chunks, strict=True):
        failures.update(failed)
        progress(len(failed))
        for group in found:
            key = tuple(group.images.shape[1:])
            if key in pending:
                group = pending.pop(key) + group
            while len(group) >= batch_size:
                head, group = group.split(batch_size)
                yield head
            if len(group):
                pending[key] = group
        if numbers[-1] in ends:
            yield from pending.values()
            pending.clear()

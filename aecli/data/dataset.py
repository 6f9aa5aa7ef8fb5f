"""The one training-data interface, and the vocabulary the data sources share.

The training loop sees its data only through `TrainingData`: held in memory as one uint8 tensor
(`ImageData`) or streamed from disk every epoch (`aecli.data.stream.StreamedData`). Both give an
epoch's order of samples from the seed and the epoch, and the batches of a rank's share of it
from any batch on, so that a resumed run trains on what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from aecli.data.images import ALLOWED_FORMATS, Failure, list_images
from aecli.data.shards import SHARD_SUFFIX
from aecli.errors import DataError

Samples = torch.Tensor | np.ndarray  # sample numbers, in some order


class Batch(NamedTuple):
    number: int  # of the batch in its epoch
    images: torch.Tensor  # uint8 (B, C, H, W); B may fall short where samples failed to decode
    samples: Samples  # the sample number of each image (on the images' device)
    failures: list[Failure]  # the batch's samples that could not be decoded


@runtime_checkable
class TrainingData(Protocol):
    """What the training loop asks of its data, in memory or streamed."""

    source: dict  # the description the run's records keep (state.json, the weights)
    class_names: list[str] | None
    labels: torch.Tensor | None  # by sample number
    skipped: list[Failure]  # samples left out before training

    def __len__(self) -> int: ...  # the training samples

    def split(self, val_fraction: float, seed: int) -> tuple[TrainingData, ImageData]:
        """(the training samples, the validation images in memory)."""
        ...

    def record(self, validation: ImageData) -> dict:
        """What a checkpoint records of these training samples and `validation`, for a resume
        to tell whether they changed (see data_change)."""
        ...

    def placed(self, place: Callable[[torch.Tensor], torch.Tensor]) -> TrainingData:
        """These data with the tensors they hold passed through `place` (to the GPU)."""
        ...

    def epoch_order(self, seed: int, epoch: int) -> Samples:
        """Every training sample number, in this epoch's order."""
        ...

    def statistics_samples(self) -> Samples:
        """The training sample numbers the latent statistics are taken over."""
        ...

    def batches(
        self,
        share: Samples,
        batch_size: int,
        start: int,
        *,
        seed: int | None,
        epoch: int,
        pin_memory: bool,
    ) -> Iterator[Batch]:
        """The batches of `share` (cut in `batch_size`) from batch `start` on, none before it
        read; `seed` None: no random crops."""
        ...


@dataclass
class ImageData:
    """A whole data set in memory: uint8 images (N, C, H, W), optional labels and class names."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    source: dict
    skipped: list[Failure] = field(default_factory=list)
    validation: ImageData | None = None  # a source's own held-out split (IDX / CIFAR test files)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> ImageData:
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index], labels, self.class_names, self.source)

    def split(self, val_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
        return split(self, val_fraction, seed)

    def record(self, validation: ImageData) -> dict:
        return {"train": self.digest(), "validation": validation.digest()}

    def digest(self) -> dict:
        """The count, and a digest of the pixels and labels."""
        tensors = [self.images] + ([] if self.labels is None else [self.labels])
        return {"count": len(self), "digest": _digest(_bytes(t) for t in tensors)}

    def placed(self, place: Callable[[torch.Tensor], torch.Tensor]) -> ImageData:
        images = place(self.images)
        labels = None if self.labels is None else self.labels.to(images.device)
        return dataclasses.replace(self, images=images, labels=labels)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=data_random("memory-order", seed, epoch))

    def statistics_samples(self) -> torch.Tensor:
        return torch.arange(len(self))

    def batches(
        self,
        share: Samples,
        batch_size: int,
        start: int,
        *,
        seed: int | None,
        epoch: int,
        pin_memory: bool,
    ) -> Iterator[Batch]:
        share = share.to(self.images.device)  # one copy per epoch, none per step
        for number in range(start, math.ceil(len(share) / batch_size)):
            index = share[number * batch_size : (number + 1) * batch_size]
            yield Batch(number, self.images[index], index, [])


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().numpy()).cast("B")


def _digest(parts: Iterable[bytes | memoryview]) -> str:
    hashed = hashlib.blake2b(digest_size=16)
    for part in parts:
        hashed.update(part)
    return hashed.hexdigest()


def digest_keys(keys: list[str]) -> dict:
    """The count and a digest of streamed samples' keys (which do not move with the folder)."""
    return {
        "count": len(keys),
        "digest": _digest(k.encode("utf-8", "surrogateescape") + b"\0" for k in keys),
    }


def data_change(before: dict, now: dict) -> str | None:
    """What differs between two TrainingData.record()s, in words (None where nothing does)."""
    changes = []
    for part, noun in (("train", "training samples"), ("validation", "validation samples")):
        was, new = before.get(part, {}), now[part]
        if was.get("digest") == new["digest"]:
            continue
        if was.get("count") == new["count"]:
            changes.append(f"{new['count']} {noun} then and now, but not the same ones")
        else:
            changes.append(f"{was.get('count')} {noun} then, {new['count']} now")
    return "; ".join(changes) or None


def validation_count(n: int, val_fraction: float) -> int:
    """How many of n images (n >= 2) `split` holds out for validation: at least one each side."""
    return min(n - 1, max(1, round(n * val_fraction)))


def split(data: ImageData, val_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """A seeded train / validation split (at least one image each side), or the source's own."""
    if data.validation is not None:
        return data, data.validation
    n = len(data)
    if n < 2:
        raise DataError(f"need at least 2 images for a train / validation split, got {n}")
    n_val = validation_count(n, val_fraction)
    order = torch.randperm(n, generator=data_random("split", seed))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


# -- image folders ------------------------------------------------------------------------------


@dataclass
class FolderListing:
    """A folder's image files (sorted), their labels from class subfolders, and what could not
    be listed."""

    root: Path
    files: list[Path]
    labels: list[int] | None
    class_names: list[str] | None
    failures: list[Failure]


def list_folder(root: Path) -> FolderListing:
    """The image files under `root` (recursively) and their labels; none is an error."""
    found, failures = list_images([root])
    files = [file for _, file in found]
    if not files:
        raise DataError(
            f"no images found (looked recursively for {', '.join(ALLOWED_FORMATS)} files) and "
            f"no WebDataset {SHARD_SUFFIX} shards in the folder",
            path=root,
        )
    labels, class_names = folder_labels([file.relative_to(root) for file in files])
    return FolderListing(root, files, labels, class_names, failures)


def folder_labels(
    relative: list[Path], known: list[str] | None = None
) -> tuple[list[int] | None, list[str] | None]:
    """Class labels from the top-level subfolder of each relative path, when every path has one
    (else None, None): numbered by the `known` class names when they cover every subfolder,
    otherwise by the sorted subfolder names."""
    if not relative or not all(len(r.parts) > 1 for r in relative):
        return None, None
    found = sorted({r.parts[0] for r in relative})
    names = known if known and set(found) <= set(known) else found
    index = {name: i for i, name in enumerate(names)}
    return [index[r.parts[0]] for r in relative], names


# -- seeds and decoding processes ---------------------------------------------------------------


def data_random(
    use: str, seed: int, epoch: int = 0, sample: int = 0
) -> torch.Generator | np.random.Generator | random.Random:
    """The random generator of one use of a run's seed in its data: `split` (which images of a
    source validate), `memory-order` or `stream-order` (an epoch's order of the images in
    memory, of the streamed samples), `sample` (a streamed sample's resize and crop in an
    epoch). Each is derived as in the releases before: a checkpoint goes on mid-epoch in the
    order it was drawn, which another derivation would change (training some images twice)."""
    if use == "split":
        return torch.Generator().manual_seed(seed)
    if use == "memory-order":
        return torch.Generator().manual_seed(step_seed(seed, -epoch))
    if use == "stream-order":
        return np.random.default_rng([seed, epoch, 0x5EED])
    if use == "sample":  # the same in every process (Python's string seeds go through SHA-512)
        return random.Random(f"{seed}:{epoch}:{sample}")
    raise ValueError(f"no such use of the seed: {use}")


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for one step (splitmix64 of seed and step): a training step's
    draws, and (with step -epoch) an epoch's order of the images in memory."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


MAX_WORKERS = 32


def default_workers(batches: int | None = None) -> int:
    """DataLoader processes to decode `batches` batches (None: many): none for one batch or
    less, which this process decodes sooner than a worker starts; else one per core but the
    one that feeds the model, up to MAX_WORKERS."""
    if batches is not None and batches <= 1:
        return 0
    return min(MAX_WORKERS, max(1, (os.cpu_count() or 2) - 1))

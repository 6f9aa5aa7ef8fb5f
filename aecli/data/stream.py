"""Streamed data sets: image folders and WebDataset tar shards read from disk every epoch.

A streamed source is a list of samples (a file, or a member of a shard found by its offset in
the tar's headers, aecli.data.shards), never their pixels: memory does not grow with the number
of images. DataLoader workers decode each batch with the one safe image reader, resize and crop
each sample (seeded by run seed, epoch and sample, so a run repeats), and hand uint8 batches to
the training loop, which takes them through the TrainingData interface as it takes the
in-memory ones.

Each epoch's order follows from the seed and the epoch: for shards the shard order is shuffled,
then the samples within each shard. Every rank takes its share of that order as the in-memory
path does, the share is cut into batches, and worker w of W decodes batches w, w + W, ...; the
DataLoader hands them back in order, so the batches do not depend on the number of workers, and
a resumed run starts at the first batch the checkpoint had not trained on, without reading the
ones before it.

Validation images are chosen by a hash of each sample's key (so the choice does not move as a
data set grows), at most `data.val_max` of them, decoded once and kept in memory.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from aecli.config import DataConfig
from aecli.data.dataset import (
    Batch,
    FolderListing,
    ImageData,
    Samples,
    data_random,
    default_workers,
    digest_keys,
    list_folder,
)
from aecli.data.images import (
    Failure,
    ImageReadError,
    crop_box,
    decode_all,
    fit_picture,
    read_image,
    read_image_bytes,
)
from aecli.data.shards import ShardMember, index_shard, open_shard, read_member
from aecli.errors import DataError, printable

OPEN_SHARDS = 64  # shard files a process keeps open at most
# The latent statistics (for `aecli sample`) come from at most this many training images.
STATISTICS_MAX = 5_000


def key_hash(key: str) -> float:
    """A sample key's place in [0, 1): the same on every machine and in every run."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# -- decoding one sample ------------------------------------------------------------------------


def fit_sample(image: Image.Image, config: DataConfig, rng: random.Random | None) -> Image.Image:
    """One decoded picture to data.image_size: the shorter side to data.resize (a size drawn
    from its range, the low end without `rng`), then a crop at a random place (data.crop:
    random, with `rng`) or the centre. Without data.resize as the in-memory path fits it
    (data.fit), the crop's place drawn where data.crop is random."""
    h, w = config.size
    sides = config.resize_range
    if sides is None and (config.crop == "center" or rng is None or config.fit == "stretch"):
        return fit_picture(image, config.size, config.fit)
    scale = None  # without data.resize: the least that covers the crop
    if sides is not None:
        side = sides[0] if rng is None else rng.randint(sides[0], sides[1])
        scale = side / min(image.height, image.width)
    place = rng if config.crop == "random" else None
    (rh, rw), (top, left) = crop_box((image.height, image.width), config.size, scale, place)
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image.crop((left, top, left + w, top + h))


# -- the data set -------------------------------------------------------------------------------


@dataclass
class StreamedData:
    """A data set read from disk: its samples (files, or members of shards), which of them
    train, the validation images in memory, labels (folders with class subfolders)."""

    keys: list[str]  # one per sample: the relative path, or SHARD/KEY
    files: list[Path] | None  # a folder's files
    shards: list[Path] | None  # or the shards and each sample's member in them
    members: list[ShardMember] | None
    labels: torch.Tensor | None
    class_names: list[str] | None
    source: dict
    config: DataConfig
    train: np.ndarray  # sample numbers that train, in sample order
    validation: ImageData | None = None  # in memory
    skipped: list[Failure] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)  # keys of the validation samples

    def __len__(self) -> int:
        return len(self.train)

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The training samples in this epoch's order: a permutation from (seed, epoch); for
        shards the shard order, then the samples within each shard."""
        rng = data_random("stream-order", seed, epoch)
        if not self.sharded:
            return self.train[rng.permutation(len(self.train))]
        shard_of = np.fromiter(
            (self.members[i].shard for i in self.train), np.int64, len(self.train)
        )
        order = []
        for shard in rng.permutation(len(self.shards)):
            mine = self.train[shard_of == shard]
            order.append(mine[rng.permutation(len(mine))])
        return np.concatenate(order) if order else self.train[:0]

    def split(self, val_fraction: float, seed: int) -> tuple[StreamedData, ImageData]:
        """Itself and its validation images, held out already (choose_validation)."""
        return self, self.validation

    def record(self, validation: ImageData) -> dict:
        """The keys of the training samples; of the validation ones where they were held out
        of the stream, else the validation images (--val-data)."""
        train = digest_keys([self.keys[i] for i in self.train])
        held = digest_keys(self.held_out) if self.held_out else validation.digest()
        return {"train": train, "validation": held}

    def placed(self, place: Callable[[torch.Tensor], torch.Tensor]) -> StreamedData:
        return self  # nothing held: each batch is decoded and placed as it comes

    def statistics_samples(self) -> np.ndarray:
        return self.train[:STATISTICS_MAX]

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
        """Decoded by the workers of batch_loader (centre crops where `seed` is None)."""
        cut = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
        for batch in batch_loader(self, cut, start, seed, epoch, pin_memory=pin_memory):
            yield Batch(*batch)

    def read(self, sample: int, at_least: int | None = None, fit=None) -> np.ndarray:
        """Decode one sample to uint8 (H, W, C), `fit` (read_image's) applied; raises
        ImageReadError."""
        channels = self.config.channels
        if not self.sharded:
            return read_image(self.files[sample], channels, at_least=at_least, fit=fit)
        member = self.members[sample]
        name = f"{self.shards[member.shard]}/{printable(member.name)}"
        try:
            data = read_member(self._shard_file(member.shard), member)
        except (OSError, DataError) as exc:
            reason = exc.message if isinstance(exc, DataError) else exc.strerror or exc
            raise ImageReadError(name, f"cannot read: {reason}") from None
        if len(data) != member.size:  # the file was cut since its headers were read
            raise ImageReadError(name, "shard ends inside this member")
        return read_image_bytes(data, name, channels, at_least=at_least, fit=fit)

    def _shard_file(self, shard: int) -> int:
        """An open descriptor of a shard, this process's own: a worker forked from a process
        that had shards open opens them again (and pread never moves a shared offset)."""
        pid, files = self.__dict__.get("_files", (None, {}))
        if pid != os.getpid():
            pid, files = os.getpid(), {}
            self.__dict__["_files"] = (pid, files)
        if shard not in files:
            if len(files) >= OPEN_SHARDS:  # the longest open one goes (dicts keep their order)
                os.close(files.pop(next(iter(files))))
            files[shard] = open_shard(self.shards[shard])
        return files[shard]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_files", None)  # open files stay in their process
        return state

    def at_least(self) -> int:
        """The smallest shorter side a decoded image may have (JPEGs decode at a reduced scale
        down to it): the high end of data.resize (a draw may ask for it), else the crop's
        longer side."""
        sides = self.config.resize_range
        return sides[1] if sides is not None else max(self.config.size)

    def sample(self, sample: int, rng: random.Random | None) -> np.ndarray | Failure:
        """One sample decoded and fitted (uint8 (H, W, C)), or why it could not be."""
        try:
            fit = lambda image: fit_sample(image, self.config, rng)  # noqa: E731
            return self.read(sample, self.at_least(), fit)
        except ImageReadError as exc:
            return Failure(exc.path, exc.reason)


def open_stream(
    path: str | Path,
    config: DataConfig,
    shards: list[Path] | None,
    listing: FolderListing | None = None,
) -> StreamedData:
    """A folder (its `listing` where list_folder gave it already) or shards as a
    StreamedData, listed (shards: their headers read), without its validation set (see
    choose_validation)."""
    skipped: list[Failure] = []
    if shards is not None:
        members: list[ShardMember] = []
        keys: list[str] = []
        for number, shard in enumerate(shards):
            found, failures = index_shard(shard, number)
            skipped += failures
            keys += [f"{shard.name}/{key}" for key in found]
            members += found.values()
        if not keys:
            raise DataError(f"no images in {len(shards)} shard(s)", path=str(path))
        source = {
            "kind": "shards",
            "path": str(path),
            "shards": len(shards),
            "count": len(keys),
            "streamed": True,
        }
        return StreamedData(
            keys,
            None,
            shards,
            members,
            None,
            None,
            source,
            config,
            np.arange(len(keys)),
            skipped=skipped,
        )
    listing = listing if listing is not None else list_folder(Path(path))
    root, files, labels = listing.root, listing.files, listing.labels
    source = {"kind": "folder", "path": str(root), "count": len(files), "streamed": True}
    return StreamedData(
        [file.relative_to(root).as_posix() for file in files],
        files,
        None,
        None,
        None if labels is None else torch.tensor(labels, dtype=torch.int64),
        listing.class_names,
        source,
        config,
        np.arange(len(files)),
        skipped=list(listing.failures),
    )


def choose_validation(
    data: StreamedData, fraction: float, validation: ImageData | None = None
) -> StreamedData:
    """Hold out the validation images: the samples whose key hashes below `fraction`, at most
    data.val_max of them (the lowest hashes), decoded once (centre crops) and kept in memory;
    or `validation` (from --val-data), holding out nothing."""
    if validation is not None:
        data.validation = validation
        return data
    hashes = np.array([key_hash(k) for k in data.keys])
    chosen = np.flatnonzero(hashes < fraction)
    chosen = chosen[np.argsort(hashes[chosen], kind="stable")][: data.config.val_max]
    if not len(chosen):  # a small set: at least one image
        chosen = np.argsort(hashes, kind="stable")[:1]
    if len(chosen) >= len(data.keys):
        raise DataError(
            f"need at least 2 images for a train / validation split, got {len(data.keys)}",
            path=data.source["path"],
        )
    decoded = decode_all(lambda i: data.sample(int(i), None), sorted(chosen))
    kept = [i for i, d in zip(sorted(chosen), decoded, strict=True) if not isinstance(d, Failure)]
    data.skipped += [d for d in decoded if isinstance(d, Failure)]
    if not kept:
        raise DataError("none of the validation images could be read", path=data.source["path"])
    images = torch.from_numpy(np.stack([d for d in decoded if not isinstance(d, Failure)]))
    labels = None if data.labels is None else data.labels[torch.tensor(kept)]
    data.validation = ImageData(
        images.permute(0, 3, 1, 2).contiguous(), labels, data.class_names, data.source
    )
    held = np.zeros(len(data.keys), bool)
    held[chosen] = True  # an unreadable validation image does not train either
    data.held_out = [data.keys[i] for i in sorted(chosen)]
    data.train = np.flatnonzero(~held)
    return data


# -- batches for the training loop --------------------------------------------------------------


class EpochBatches(IterableDataset):
    """One rank's batches of one epoch (lists of sample numbers), from batch `start` on: worker
    w of W decodes batches start + w, start + w + W, ... and the DataLoader returns them in
    order. Each item: (batch number, uint8 (B, C, H, W) images, the sample numbers of those
    images, the failures of the others)."""

    def __init__(
        self,
        data: StreamedData,
        batches: list[np.ndarray],
        start: int,
        seed: int | None,
        epoch: int,
    ):
        self.data, self.batches, self.start = data, batches, start
        self.seed, self.epoch = seed, epoch  # seed None: no random crops (validation, stats)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for number in range(self.start + worker, len(self.batches), workers):
            images, kept, failures = [], [], []
            for sample in self.batches[number]:
                rng = None
                if self.seed is not None:
                    rng = data_random("sample", self.seed, self.epoch, int(sample))
                decoded = self.data.sample(int(sample), rng)
                if isinstance(decoded, Failure):
                    failures.append(decoded)
                else:
                    images.append(decoded)
                    kept.append(int(sample))
            c = self.data.config.channels
            h, w = self.data.config.size
            stacked = (
                torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
                if images
                else torch.empty((0, c, h, w), dtype=torch.uint8)
            )
            yield number, stacked, torch.tensor(kept, dtype=torch.int64), failures


def batch_loader(
    data: StreamedData,
    batches: list[np.ndarray],
    start: int,
    seed: int | None,
    epoch: int,
    *,
    pin_memory: bool,
):
    """A DataLoader over EpochBatches with data.workers processes (default_workers), never
    more than there are batches left, pinning where the device wants it."""
    left = max(0, len(batches) - start)
    workers = data.config.workers
    workers = min(default_workers(left) if workers is None else workers, left)
    return torch.utils.data.DataLoader(
        EpochBatches(data, batches, start, seed, epoch),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_ctrl_c if workers else None,
    )


def _ignore_ctrl_c(_: int) -> None:
    """A terminal's Ctrl-C reaches the workers too: they go on decoding while the training
    loop finishes its step and saves, and end when the loader is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

"""`encode_files` (files into one latent file) and `decoded_images` (latents back to images)."""

from __future__ import annotations

import bisect
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from aecli.data.dataset import folder_labels
from aecli.data.images import Failure
from aecli.devices import release_free_memory
from aecli.errors import UsageError, WriteError
from aecli.inference.inputs import Buckets, InputFile, Progress, load_batches, no_progress
from aecli.inference.outputs import hwc
from aecli.inference.predictor import Predictor
from aecli.io.latent_folder import SHARD_BYTES, FolderWriter, Plan, write_latent_folder
from aecli.io.latents import (
    STDIO,
    STORAGE,
    LatentFile,
    LatentScaling,
    names_folder,
    output_format,
    write_latents,
)

if TYPE_CHECKING:  # the engine package loads the trainer
    from aecli.distributed import Distributed


STORES = ("mean", "sample", "moments")  # what `encode --store` keeps of a VAE's posterior


@dataclass(frozen=True)
class EncodeSettings:
    """What decides an encode's latents (recorded in a latent folder, and checked by --resume)."""

    size: tuple[int, int] | None  # None: each image's own size
    buckets: Buckets | None = None  # aspect buckets instead of one size
    store: str = "mean"  # the posterior's mean, a draw from it, or its mean and std (STORES)
    seed: int = 0
    scaling: LatentScaling | None = None
    flip: bool = False  # each image's mirror image encoded too (latents_flip)
    dtype: str = "float32"  # what the latents are stored in (io.latents.STORAGE)
    precision: str = "fp32"  # what the encoder computes in (auto, fp32, bf16)

    @property
    def sample(self) -> bool:
        return self.store == "sample"

    def record(self, shard_size: int) -> dict:
        return {
            "size": "native" if self.size is None else list(self.size),
            "buckets": None if self.buckets is None else [list(b) for b in self.buckets.sizes],
            "store": self.store,
            "flip": self.flip,
            "dtype": self.dtype,
            "precision": self.precision,
            "seed": self.seed if self.sample else None,
            "scaling": None if self.scaling is None else self.scaling.record(),
            "shard_size": shard_size,
        }


@dataclass
class EncodedUnit:
    """One unit of work: a run of consecutive input files, encoded."""

    number: int
    parts: list[LatentFile]  # one per latent shape, in the order of each shape's first file
    failures: list[Failure]


def encode_units(
    predictor: Predictor,
    files: list[InputFile],
    units: list[tuple[int, range]],
    settings: EncodeSettings,
    *,
    labels: list[int] | None = None,
    class_names: list[str] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = no_progress,
    one_shape: bool = False,
) -> Iterator[EncodedUnit]:
    """Encode each unit (its number, and the range of `files` it covers) in turn, yielding it
    as soon as its last file is done: memory holds one unit's latents at a time.

    A unit's batches and an image's --sample noise (its own generator, from the seed and the
    file's number) do not depend on which units are encoded, in which process, or after which
    interruption: a unit's latents are the same wherever and whenever it is encoded.
    `one_shape` refuses (before encoding further) a second latent shape, naming both files.
    """
    failures: dict[int, Failure] = {}
    starts = [r.start for _, r in units]
    # the open unit's latents, per shape: (file number, {LatentFile field: latent})
    found: dict[tuple, list[tuple[int, dict[str, torch.Tensor]]]] = {}
    open_unit = 0

    def close(position: int) -> EncodedUnit:
        number, covered = units[position]
        parts = []
        for rows in sorted(found.values(), key=lambda rows: min(i for i, _ in rows)):
            rows.sort(key=lambda row: row[0])
            numbers = [i for i, _ in rows]
            stored = {field: torch.stack([row[field] for _, row in rows]) for field in rows[0][1]}
            parts.append(
                LatentFile(
                    labels=None if labels is None else torch.tensor([labels[i] for i in numbers]),
                    fingerprint=predictor.fingerprint,
                    sources=[files[i].name for i in numbers],
                    class_names=class_names,
                    scaling=settings.scaling,
                    dtype=settings.dtype,
                    **stored,
                )
            )
        found.clear()
        failed = [failures.pop(i) for i in covered if i in failures]
        return EncodedUnit(number, parts, failed)

    per_batch = predictor.images_per_batch(batch_size)
    for batch in load_batches(
        files,
        predictor.channels,
        settings.size,
        per_batch,
        workers,
        failures=failures,
        progress=progress,
        pin_memory=predictor.execution.pins_memory,
        groups=[r for _, r in units],
        buckets=settings.buckets,
        smallest=predictor.smallest_side,
    ):
        position = bisect.bisect_right(starts, batch.indices[0]) - 1
        while open_unit < position:
            yield close(open_unit)
            open_unit += 1
        images, count = _padded_batch(batch.images, per_batch)
        numbers = batch.indices + [batch.indices[-1]] * (len(images) - count)
        z = _encoded(predictor, images, numbers, settings, count)
        if settings.flip:  # the mirror images, in another batch of the same shape
            flipped = _encoded(predictor, images.flip(-1), numbers, settings, count, flip=True)
            z.update({"flip" if key == "latents" else "flip_std": t for key, t in flipped.items()})
        shape = tuple(z["latents"].shape[1:])
        if one_shape and found and shape not in found:
            had, rows = next(iter(found.items()))
            a, b = files[rows[0][0]].path, files[batch.indices[0]].path
            raise UsageError(
                f"{a} gives latents of shape {'x'.join(map(str, had))} but {b} of "
                f"{'x'.join(map(str, shape))}: one latent file holds latents of one shape; write "
                "a latent folder (-o DIR/), which groups shapes into shards, or pass --size or "
                "--buckets"
            )
        rows = [{key: value[row] for key, value in z.items()} for row in range(count)]
        found.setdefault(shape, []).extend(zip(batch.indices, rows, strict=True))
        progress(len(batch))
    while open_unit < len(units):
        yield close(open_unit)
        open_unit += 1


def _encoded(
    predictor: Predictor,
    images: torch.Tensor,
    numbers: list[int],
    settings: EncodeSettings,
    count: int,
    *,
    flip: bool = False,
) -> dict[str, torch.Tensor]:
    """A batch's first `count` latents as `settings.store` keeps them, scaled where asked, on
    the CPU, by LatentFile field: {"latents": ...} and, for moments, "std" (a standard
    deviation scales by the scale alone; patches move it as they move the mean)."""
    scaling = settings.scaling
    if settings.store == "moments":
        mean, std = (t[:count] for t in predictor.moments(images))
        if scaling is not None:
            mean, std = scaling.apply(mean), scaling.apply_spread(std)
        return {"latents": mean.cpu(), "std": std.cpu()}
    generators = None
    if settings.sample:
        generators = predictor.image_generators(settings.seed, numbers, flip=flip)
    z = predictor.encode(images, generators)[:count]
    return {"latents": (z if scaling is None else scaling.apply(z)).cpu()}


def _padded_batch(images: torch.Tensor, full: int) -> tuple[torch.Tensor, int]:
    """A short batch (a unit's last of a shape) padded with copies of its last image to a power
    of two, and how many images are real. Every new batch shape leaves the C heap and oneDNN's
    caches holding more memory; padding keeps the shapes few (measured over 400 batches of 6
    image sizes: 650 MB at one batch size, 786 MB at powers of two, 1.18 GB and growing at
    every size from 1 to 32), for a few percent more work on the last batches of a unit."""
    count = len(images)
    size = min(1 << (count - 1).bit_length(), full)  # never past a full batch
    if size <= count:
        return images, count
    return torch.cat([images, images[-1:].expand(size - count, *images.shape[1:])]), count


def file_labels(
    files: list[InputFile], known: list[str] | None
) -> tuple[list[int] | None, list[str] | None]:
    """Labels from subfolder names when every file sits in a subfolder of an input folder (as
    for training), numbered by the weights' class names when they cover them all."""
    return folder_labels([Path(f.name) for f in files], known)


def encode_files(
    predictor: Predictor,
    files: list[InputFile],
    settings: EncodeSettings,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = no_progress,
) -> tuple[LatentFile, list[Failure]]:
    """Encode files into one latent file (small jobs: it is held in memory), all of one latent
    shape. `settings.scaling` writes the latents as diffusion models consume them."""
    labels, class_names = file_labels(files, predictor.info.class_names)
    (unit,) = encode_units(
        predictor,
        files,
        [(0, range(len(files)))],
        settings,
        labels=labels,
        class_names=class_names,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        one_shape=True,
    )
    if not unit.parts:
        return LatentFile(torch.empty(0)), unit.failures
    return unit.parts[0], unit.failures


def default_shard_size(predictor: Predictor, settings: EncodeSettings) -> int:
    """Latents per shard so that a shard holds about SHARD_BYTES (256 MiB) of stored tensors
    (the latents, their std and their mirror images' where stored, in the stored dtype) at the
    encode's size (the largest bucket; the model's input size for --size native)."""
    if settings.buckets is not None:
        size = max(settings.buckets.sizes, key=lambda s: s[0] * s[1])
    else:
        size = settings.size or predictor.size
    shape = predictor.latent_shape
    if predictor.spatial:
        f = predictor.factor
        shape = (shape[0], -(-size[0] // f), -(-size[1] // f))
    tensors = (2 if settings.store == "moments" else 1) * (2 if settings.flip else 1)
    each = STORAGE[settings.dtype].itemsize * math.prod(shape) * tensors
    return max(1, min(1 << 20, SHARD_BYTES // each))


def inputs_digest(files: list[InputFile]) -> str:
    """A fingerprint of the input list (names and order), to know a resumed run's inputs."""
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(file.name.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def file_stats(files: list[InputFile]) -> np.ndarray:
    """Each file's size and mtime_ns, int64 (N, 2) (links followed; -1 where they cannot be
    had): what tells a resumed run that a name now holds another picture."""
    found = np.full((len(files), 2), -1, dtype=np.int64)
    for number, file in enumerate(files):
        try:
            info = os.stat(file.path)
        except OSError:
            continue
        found[number] = info.st_size, info.st_mtime_ns
    return found


class FolderEncode:
    """An encode into a latent folder, in one process or in each of torchrun's: the inputs in
    units of `shard_size` consecutive files, each written as shards (one per latent shape) as
    soon as it is encoded, the units shared out over the processes (unit k to process k mod N
    of those still to do), the index written last by the main process.

    Checking and preparing the folder happens at construction (every process checks, the main
    one changes it); `run` encodes this process's units; `finish` writes the index."""

    def __init__(
        self,
        predictor: Predictor,
        files: list[InputFile],
        out: Path,
        settings: EncodeSettings,
        *,
        shard_size: int,
        roots: list[Path] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        force: bool = False,
        dist: Distributed | None = None,
    ):
        """`roots`: the INPUT arguments the files were found in (recorded, and compared by
        --resume)."""
        self.predictor, self.files, self.settings = predictor, files, settings
        if dist is None:
            from aecli.distributed import Distributed

            dist = Distributed(device=predictor.device)
        self.dist = dist
        self.labels, class_names = file_labels(files, predictor.info.class_names)
        count = len(files)
        units = [
            (k, range(start, min(start + shard_size, count)))
            for k, start in enumerate(range(0, count, shard_size))
        ]
        plan = Plan(
            predictor.fingerprint,
            predictor.name,
            {**settings.record(shard_size), **predictor.tiling_settings()},
            count,
            inputs_digest(files),
            len(units),
            class_names,
            roots=None if roots is None else [os.path.abspath(r) for r in roots],
            variational=predictor.variational,
            file_stats=file_stats(files),
            file_paths=[f.path for f in files],
        )
        self.plan = plan
        if self.dist.world > 1:  # every process must cut the same inputs into the same units
            mine = int(plan.inputs_digest[:15], 16)
            most, least = self.dist.max([mine, -mine])
            if most != mine or -least != mine:
                raise UsageError(
                    "the processes found different input files (is a folder still being "
                    "written, or not shared alike?); each process must see the same inputs"
                )
        self.writer = FolderWriter(out, plan, main=self.dist.main)
        action = self.writer.check(resume=resume, overwrite=overwrite, force=force)
        self.dist.barrier()
        self.writer.make_ready(action)
        self.dist.barrier()
        done = self.writer.finished_units()
        pending = [unit for unit in units if unit[0] not in done]
        self.units_done = len(units) - len(pending)
        self.mine = pending[self.dist.rank :: self.dist.world]
        self.images_done = sum(len(r) for k, r in units if k in done)

    @property
    def to_encode(self) -> int:
        """Input files this process encodes."""
        return sum(len(r) for _, r in self.mine)

    def run(
        self, *, batch_size: int = 32, workers: int | None = None, progress: Progress = no_progress
    ) -> None:
        """Encode this process's units, each on disk (shards, then its record) before the
        next; a full disk stops with one line, keeping every complete unit for --resume."""
        try:
            for unit in encode_units(
                self.predictor,
                self.files,
                self.mine,
                self.settings,
                labels=self.labels,
                class_names=self.plan.class_names,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
            ):
                failed = [{"path": str(f.path), "reason": f.reason} for f in unit.failures]
                self.writer.write_unit(unit.number, unit.parts, failed)
                del unit
                release_free_memory()  # memory flat over any number of units (see there)
        except WriteError as exc:
            raise WriteError(
                f"{exc}; every complete shard is kept: free space, then run the same command "
                "with --resume"
            ) from exc

    def close(self) -> None:
        """Let go of the folder (its lock), whatever happened."""
        self.writer.release()

    def finish(self, listing_failures: list[Failure] = ()) -> dict | None:
        """Once every process is done: the index (the main process writes it and returns it;
        the others return None)."""
        self.dist.barrier()
        if not self.dist.main:
            return None
        listed = [{"path": str(f.path), "reason": f.reason} for f in listing_failures]
        return self.writer.finish(listed)


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


def latent_format(option: str, target: str | None, fmt: str | None) -> str | None:
    """The latent file format `option TARGET` (and --format FMT) writes; None for a latent
    folder (a TARGET named as one) or no TARGET."""
    if target is None:
        return None
    if not names_folder(target):
        return output_format(target, fmt)
    if fmt not in (None, "safetensors"):
        raise UsageError(
            f"--format {fmt}: a latent folder holds safetensors shards; {option} {target} "
            "names a folder (a latent file's name ends in .safetensors or .npy)"
        )
    return None


def write_latent_target(
    option: str, target: str, latents: LatentFile, fmt: str | None, guard, *, overwrite: bool,
    weights: Path, settings: dict,
) -> None:  # fmt: skip
    """Latents into `option TARGET`: a latent folder (`fmt` None; `settings` recorded in its
    index), a latent file or - for stdout; where it may write checked by `guard` (an
    OutputGuard) first."""
    if fmt is None:
        guard.check(option, [], overwrite=overwrite, out_dir=Path(target))
        write_latent_folder(
            Path(target), latents, weights=str(weights), settings=settings, overwrite=overwrite
        )
        return
    if target != STDIO:
        guard.check(option, [Path(target)], overwrite=overwrite)
    write_latents(target, latents, fmt)


def check_folder_fits(
    predictor: Predictor, shapes: list[tuple[int, ...]], fingerprint: str | None, name: str, *,
    scaling: LatentScaling | None, force: bool,
) -> None:  # fmt: skip
    """Whether a latent folder's latents, of each of `shapes`, fit the model (`Predictor.fit`),
    checked before any is decoded."""
    for shape in shapes:
        predictor.fit(
            LatentFile(torch.zeros(1, *shape), None, fingerprint, name=name),
            force=force,
            scaling=scaling,
        )

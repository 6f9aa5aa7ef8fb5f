"""Latent folders: a data set's latents as safetensors shards, each an
ordinary aecli latent file of one latent shape, with `index.json` written last.

While an encode runs the folder also holds `encode.json` (what is being encoded, for --resume)
and one `unit-NNNNNN.json` per finished unit of work (a run of consecutive input files whose
shards are all on disk). A kill leaves complete units and at most one partial unit per process;
--resume removes the partial ones and encodes what no complete unit holds. The last step writes
`index.json` from the unit records, then removes them and `encode.json`.

    DIR/index.json                      what the folder holds (below)
    DIR/latents-000000.safetensors      unit 0's latents (one shape)
    DIR/latents-000001-0.safetensors    unit 1's latents of its first shape
    DIR/latents-000001-1.safetensors    ... of its second shape
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import operator
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import aecli
from aecli.errors import UsageError, first_and_more
from aecli.io.atomic import atomic_write_parts, atomic_write_text, is_temp_name, temp_target
from aecli.io.jsonfile import read_json_file
from aecli.io.latents import (
    FORMAT,
    SAFETENSORS_DTYPES,
    STORAGE,
    STORED,
    LatentFile,
    LatentFileError,
    LatentScaling,
    latent_parts,
    read_latents,
)
from aecli.io.locks import FolderLock, lock_holder
from aecli.io.shard_files import (
    NUMPY_DTYPES,
    ShardFile,
    ShardFiles,
    ShardHeader,
    file_identity,
    read_shard_header,
)

FOLDER_FORMAT = "aecli-latent-folder"
FOLDER_VERSION = "1"
INDEX = "index.json"
PLAN = "encode.json"
LOCK = ".aecli-encode.lock"
SHARD = re.compile(r"^latents-(\d{6,})(?:-(\d+))?\.safetensors$")
UNIT = re.compile(r"^unit-(\d{6,})\.json$")
INDEX_LIMIT = 4 << 30  # bytes of index.json read at most (ImageNet's is about 100 MB)
SHARD_BYTES = 256 << 20  # the default shard holds about this many bytes of latents


def shard_name(unit: int, part: int | None) -> str:
    return (
        f"latents-{unit:06d}.safetensors"
        if part is None
        else f"latents-{unit:06d}-{part}.safetensors"
    )


def unit_name(unit: int) -> str:
    return f"unit-{unit:06d}.json"


def is_latent_folder(path: str | Path) -> bool:
    """A folder that an encode wrote or is writing (its index or its plan is there, and is an
    aecli record: a user's own index.json does not make a folder a latent folder)."""
    path = Path(path)
    return path.is_dir() and (_wrote(path, INDEX) or _wrote(path, PLAN))


def _ours(name: str) -> bool:
    """A name aecli writes into a latent folder (temporary files of those included)."""
    if is_temp_name(name):
        name = temp_target(name)
    return name in (INDEX, PLAN, LOCK) or bool(SHARD.match(name) or UNIT.match(name))


# How each file aecli writes into a latent folder begins: a file of one of its names that does
# not begin so is a user's own (issue 45: `index.json` of an app), never replaced or removed.
_RECORD = re.compile(rb'\s*\{\s*"format"\s*:\s*"' + FOLDER_FORMAT.encode() + rb'"')
_UNIT_RECORD = re.compile(rb'\s*\{\s*"unit"\s*:\s*\d+\s*,\s*"shards"\s*:')
_SHARD_FORMAT = b'"format":"aecli-latents"'
_HEAD = 64 << 10  # bytes of a shard's header searched at a time for its format
_HEADER_LIMIT = 4 << 20  # ... and at most


def _wrote(folder: Path, name: str) -> bool:
    """Whether `folder/name` is a file aecli wrote there: one of its names, a regular file (not a
    link), and its first bytes those of the record, shard or lock that name stands for."""
    if not _ours(name):
        return False
    path = folder / name
    if name == LOCK and lock_holder(path) == os.getpid():  # opening it would let go of it
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, a link (ELOOP), or unreadable: not a file aecli can vouch for
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        if is_temp_name(name):  # half written: only its name tells
            return True
        if name == LOCK:
            text = os.pread(fd, 33, 0)
            return len(text) <= 32 and (not text or text.strip().isdigit())
        if name in (INDEX, PLAN):
            return bool(_RECORD.match(os.pread(fd, 256, 0)))
        if UNIT.match(name):
            return bool(_UNIT_RECORD.match(os.pread(fd, 256, 0)))
        return _shard_header_names_format(fd)
    except OSError:
        return False
    finally:
        os.close(fd)


def _shard_header_names_format(fd: int) -> bool:
    """Whether a safetensors file's header says it is an aecli latent file (its metadata keys
    are sorted, so the format comes early: after the version and the class names)."""
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        return False
    length = min(int.from_bytes(prefix, "little"), _HEADER_LIMIT)
    seen, at = b"", 8
    while at < 8 + length:
        chunk = os.pread(fd, min(_HEAD, 8 + length - at), at)
        if not chunk:
            return False
        seen = seen[-len(_SHARD_FORMAT) :] + chunk
        if _SHARD_FORMAT in seen:
            return True
        at += len(chunk)
    return False


def writer_process(folder: Path) -> int | None:
    """The process id of another process writing `folder` now (holding its lock), or None."""
    holder = lock_holder(folder / LOCK)
    return holder if holder is not None and holder != os.getpid() else None


BUSY = "another aecli encode is writing this folder"


def busy(pid: int) -> str:
    """The refusal of a folder another process is writing: its process id, and what to do."""
    return f"{BUSY} (process {pid}); wait for it to finish"


def _temporary(name: str) -> bool:
    return is_temp_name(name) and _ours(name)


Count = Annotated[int, Field(strict=True, ge=0)]
Whole = Annotated[int, Field(strict=True, ge=1)]


class ShardEntry(BaseModel):
    """One shard as the index (or a unit record) lists it, checked field by field where it is
    read: JSON that anyone may have edited."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    file: str
    count: Whole
    shape: tuple[Whole, ...] = Field(strict=False, min_length=1, max_length=3)  # JSON's list
    offset: Count  # where the first stored tensor's values start in the file
    bytes: Count
    fingerprint: str
    sources: list[str]
    labels: list[Count] | None

    @field_validator("file")
    @classmethod
    def _shard_name(cls, file: str) -> str:
        if not SHARD.match(file):  # never a path: entries name files inside the folder
            raise ValueError(f"{file[:60]!r} is not a shard name (latents-NNNNNN.safetensors)")
        return file

    @model_validator(mode="after")
    def _one_per_latent(self) -> ShardEntry:
        if len(self.sources) != self.count:
            raise ValueError(f"{self.count} latents but not as many source names")
        if self.labels is not None and len(self.labels) != self.count:
            raise ValueError(f"{self.count} latents but not as many labels")
        return self


class EncodeRecord(BaseModel):
    """What an encode into a folder is: `encode.json` while it runs, the head of `index.json`
    after. A resumed run is checked against it (the same settings and inputs), or it would mix
    two data sets in one folder."""

    model_config = ConfigDict(strict=True, extra="ignore")

    format: Literal["aecli-latent-folder"]
    format_version: str = FOLDER_VERSION
    fingerprint: str
    weights: str
    variational: bool | None = None
    settings: dict[str, Any]  # what decides the latents: size, buckets, store, dtype, seed, ...
    roots: list[str] | None = None
    inputs: Count
    inputs_digest: str
    class_names: list[str] | None = None


class PlanRecord(EncodeRecord):
    """`encode.json`: an encode in progress, in `units` units of work."""

    units: Count


class FolderIndex(EncodeRecord):
    """`index.json`: a finished folder, every shard listed."""

    aecli_version: str | None = None
    count: Count
    shapes: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    shards: list[ShardEntry]


class UnitRecord(BaseModel):
    """`unit-NNNNNN.json`: one finished unit of work, written after all its shards."""

    model_config = ConfigDict(strict=True, extra="ignore")

    unit: Count
    shards: list[ShardEntry]
    failures: list[dict[str, Any]]  # {"path": ..., "reason": ...}
    inputs: list[list[int]] | None = None  # its input files' [size, mtime_ns] when encoded

    @classmethod
    def read(cls, path: Path) -> UnitRecord:
        return cls.model_validate(_read_json(path, path.name))


def record_problem(exc: ValidationError) -> str:
    """A record's first problem in words: where in the JSON and what is wrong."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


# -- writing -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What an encode into a folder is, as `encode.json` records it: a resumed run must be the
    same encode (settings and inputs), or it would mix two data sets in one folder."""

    fingerprint: str
    weights: str
    settings: dict  # what decides the latents: size, buckets, sample, seed, scaling, shard size
    inputs: int
    inputs_digest: str
    units: int
    class_names: list[str] | None
    roots: list[str] | None = None  # the INPUT arguments, as absolute paths
    variational: bool | None = None  # a VAE's posterior (mean or draw), else a plain code
    # each input file's size and mtime_ns now, int64 (N, 2): a unit's record keeps its files'
    # (checked by --resume); and the files, for messages
    file_stats: np.ndarray | None = field(default=None, repr=False)
    file_paths: list[Path] | None = field(default=None, repr=False)

    def record(self) -> PlanRecord:
        return PlanRecord(
            format=FOLDER_FORMAT,
            fingerprint=self.fingerprint,
            weights=self.weights,
            variational=self.variational,
            settings=self.settings,
            roots=self.roots,
            inputs=self.inputs,
            inputs_digest=self.inputs_digest,
            units=self.units,
            class_names=self.class_names,
        )

    def unit_files(self, unit: int) -> range:
        """The input files unit `unit` covers."""
        size = self.settings["shard_size"]
        return range(unit * size, min((unit + 1) * size, self.inputs))


# how each setting is named on the command line, for messages
SETTING_OPTIONS = {
    "size": "--size",
    "buckets": "--buckets",
    "store": "--store / --sample",
    "flip": "--flip",
    "dtype": "--dtype",
    "precision": "--precision",
    "seed": "--seed",
    "scaling": "--scaled / --scaling-factor / --shift-factor",
    "shard_size": "--shard-size",
    "tile": "--tile",
    "no_tile": "--no-tile",
    "tile_fast": "--tile-fast",
    "tile_overlap": "--tile-overlap",
}


def _unset(value) -> bool:
    return value is None or value is False


def _setting_change(option: str, then, now) -> str:
    """How a setting differs, for the refusal of a --resume: `was encoded with --size 16x16,
    this command gives 32x32`, or for a flag `with --tile-fast, this command without it`."""
    if isinstance(then, bool) or isinstance(now, bool):
        return (
            f"with {option}, this command without it"
            if then
            else f"without {option}, this command with it"
        )
    then, now = (_shown(v) for v in (then, now))
    return f"with {option} {then}, this command gives {now}"


def _shown(value) -> str:
    """A setting for a message: a scaling in words (per-channel factors are many), else JSON."""
    if _unset(value):
        return "not set"
    if isinstance(value, dict) and "scale" in value:
        try:
            return LatentScaling.from_record(value).describe()
        except ValueError:
            pass
    return json.dumps(value)


class FolderWriter:
    """Writes an encode's units into a latent folder, and its index at the end.

    Every process of a torchrun encode makes one; only the `main` one changes the folder
    outside its own units (cleaning, the plan, the index)."""

    def __init__(self, folder: Path, plan: Plan, *, main: bool = True):
        self.folder, self.plan, self.main = folder, plan, main
        self._lock: FolderLock | None = None

    # -- before: the folder's state, checked by every process, changed by the main one

    def check(self, *, resume: bool, overwrite: bool, force: bool) -> str:
        """What to do with the folder: `new`, `overwrite` or `resume`; refused (one line) where
        it would lose or mix a user's files. Every process checks (reading only), before the
        main one changes anything (`make_ready`)."""
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"-o {folder}: exists and is not a folder")
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
        writer = writer_process(folder)
        if writer is not None:
            raise UsageError(f"-o {folder}: {busy(writer)}")
        foreign = [n for n in names if not _wrote(folder, n) and os.path.lexists(folder / n)]
        if foreign:
            raise UsageError(
                f"-o {folder}: holds files aecli did not write ({first_and_more(foreign)}); a "
                "latent folder must be new or empty, choose another"
            )
        started = PLAN in names or INDEX in names or any(SHARD.match(n) for n in names)
        if not started:
            return "new"
        if overwrite:
            return "overwrite"
        if not resume:
            what = "holds a finished encode" if INDEX in names else "holds an unfinished encode"
            raise UsageError(
                f"-o {folder}: {what}; pass --resume to continue it or --overwrite to encode "
                "again from the start"
            )
        self._check_resumable(names, force)
        return "resume"

    def make_ready(self, action: str) -> None:
        """Lock the folder for this run, and (the main process) start it over, or clean what a
        killed run left, and write the plan."""
        if not self.main:
            return
        self._take_lock()
        if action == "overwrite":
            self._remove([n for n in os.listdir(self.folder) if n != LOCK])
        names = os.listdir(self.folder)
        if PLAN not in names and INDEX not in names:
            atomic_write_text(self.folder / PLAN, self.plan.record().model_dump_json(indent=1))
        self._clean()

    def _check_resumable(self, names: list[str], force: bool) -> None:
        source = INDEX if INDEX in names else PLAN if PLAN in names else None
        if source is None:
            raise UsageError(
                f"--resume: {self.folder} holds latent shards but neither {PLAN} nor {INDEX}; "
                "pass --overwrite to encode again"
            )
        where = f"--resume: {self.folder / source}"
        raw = _read_json(self.folder / source, where)
        if not isinstance(raw, dict) or raw.get("format") != FOLDER_FORMAT:
            raise UsageError(f"{where}: not an aecli latent folder record")
        try:
            record = EncodeRecord.model_validate(raw)
        except ValidationError as exc:
            raise UsageError(f"{where}: damaged ({record_problem(exc)})") from None
        fingerprint = record.fingerprint
        if fingerprint != self.plan.fingerprint and not force:
            raise UsageError(
                f"--resume: {self.folder} was written by model {fingerprint}, not by "
                f"{self.plan.weights} (model {self.plan.fingerprint}); pass --force to continue "
                "with these weights, or --overwrite to start over"
            )
        settings = record.settings
        for key, option in SETTING_OPTIONS.items():
            then, now = settings.get(key), self.plan.settings.get(key)
            if then != now and not (_unset(then) and _unset(now)):
                raise UsageError(
                    f"--resume: {self.folder} was encoded {_setting_change(option, then, now)}; "
                    "give the same, or --overwrite to start over"
                )
        again = "give the same inputs, or --overwrite to start over"
        roots = record.roots
        if roots is not None and self.plan.roots is not None and roots != self.plan.roots:
            raise UsageError(
                f"--resume: {self.folder} was started with the inputs {_paths(roots)}, this "
                f"command gives {_paths(self.plan.roots)}; {again}"
            )
        inputs, digest = record.inputs, record.inputs_digest
        if digest != self.plan.inputs_digest:
            raise UsageError(
                f"--resume: the inputs differ from those {self.folder} was started with "
                f"({inputs} files then, {self.plan.inputs} now); {again}"
            )
        if source == PLAN:
            self._check_files_unchanged(again)

    def _check_files_unchanged(self, again: str) -> None:
        """Refuse a resume where a file that a finished unit encoded has changed since (another
        size or modification time: another picture under the same name)."""
        stats, paths = self.plan.file_stats, self.plan.file_paths
        if stats is None or paths is None:
            return
        for unit, record in sorted(self.finished_units().items()):
            if record.inputs is None:
                continue
            covered = self.plan.unit_files(unit)
            for number, then in zip(covered, record.inputs, strict=False):
                if list(then) != stats[number].tolist():
                    raise UsageError(
                        f"--resume: {paths[number]} is not the file {self.folder} was started "
                        f"with (another size or modification time); {again}"
                    )

    def _take_lock(self) -> None:
        """The folder's lock for the run's life (the main process)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FolderLock(self.folder, LOCK, f"-o {self.folder}: {BUSY}")

    def release(self, *, remove: bool = False) -> None:
        if self._lock is not None:
            self._lock.release(remove=remove)
            self._lock = None

    def _remove(self, names: list[str]) -> None:
        for name in names:
            (self.folder / name).unlink(missing_ok=True)

    def _clean(self) -> None:
        """Remove what a killed run left: temporary files, shards of units without a record,
        records whose shards are not all there."""
        names = os.listdir(self.folder)
        self._remove([n for n in names if _temporary(n)])
        if INDEX in names:  # finished: only what the last step had left to remove
            self._remove([n for n in names if UNIT.match(n) or n == PLAN])
            return
        done = self.finished_units()
        parts = [n for n in names if SHARD.match(n)]
        kept = {entry.file for record in done.values() for entry in record.shards}
        self._remove([n for n in parts if n not in kept])
        self._remove([n for n in names if UNIT.match(n) and int(UNIT.match(n)[1]) not in done])

    # -- during: units, each complete on disk before its record

    def finished_units(self) -> dict[int, UnitRecord]:
        """The units whose record and every shard are on disk (an index means all)."""
        index = self.folder / INDEX
        if index.is_file():
            return {u: UnitRecord(unit=u, shards=[], failures=[]) for u in range(self.plan.units)}
        done: dict[int, UnitRecord] = {}
        for name in os.listdir(self.folder):
            match = UNIT.match(name)
            if not match or int(match[1]) >= self.plan.units or not (self.folder / name).is_file():
                continue
            try:
                record = UnitRecord.read(self.folder / name)
            except (LatentFileError, ValidationError):
                continue  # damaged: the unit is encoded again
            if record.unit == int(match[1]) and all(
                _size(self.folder / e.file) == e.bytes for e in record.shards
            ):
                done[record.unit] = record
        return done

    def write_unit(self, unit: int, parts: list[LatentFile], failures: list[dict]) -> None:
        """A unit's shards (one per latent shape), then its record; each file atomically."""
        entries = []
        for part, latents in enumerate(parts):
            name = shard_name(unit, part if len(parts) > 1 else None)
            chunks, offset = latent_parts(latents)
            atomic_write_parts(self.folder / name, chunks)
            entries.append(
                ShardEntry(
                    file=name,
                    count=len(latents),
                    shape=tuple(latents.latents.shape[1:]),
                    offset=offset,
                    bytes=sum(len(c) for c in chunks),
                    fingerprint=latents.fingerprint or "",
                    sources=list(latents.sources),
                    labels=None if latents.labels is None else latents.labels.tolist(),
                )
            )
        stats = self.plan.file_stats
        files = self.plan.unit_files(unit)
        inputs = None if stats is None else stats[files.start : files.stop].tolist()
        record = UnitRecord(unit=unit, shards=entries, failures=failures, inputs=inputs)
        atomic_write_text(self.folder / unit_name(unit), record.model_dump_json())

    # -- after: the index, from the unit records in order

    def finish(self, listing_failures: list[dict]) -> dict:
        """Write index.json from every unit's record (the main process, once all are done),
        then remove the records and the plan. Returns the index."""
        index_path = self.folder / INDEX
        if index_path.is_file():  # a run killed after its index: only the cleaning was left
            index = _read_json(index_path, str(index_path))
        else:
            done = self.finished_units()
            missing = [u for u in range(self.plan.units) if u not in done]
            if missing:
                raise UsageError(
                    f"{self.folder}: {len(missing)} unit(s) of work are not on disk (first: "
                    f"{missing[0]}); rerun with --resume"
                )
            records = [done[u] for u in range(self.plan.units)]
            shards = [e for r in records for e in r.shards]
            shapes: dict[tuple, int] = {}
            for entry in shards:
                shapes[entry.shape] = shapes.get(entry.shape, 0) + entry.count
            record = FolderIndex(
                **self.plan.record().model_dump(exclude={"units"}),
                aecli_version=aecli.__version__,
                count=sum(e.count for e in shards),
                shapes=[{"shape": list(s), "count": n} for s, n in shapes.items()],
                failures=listing_failures + [f for r in records for f in r.failures],
                shards=shards,
            )
            index = record.model_dump(mode="json")
            atomic_write_text(index_path, json.dumps(index, indent=1))
        names = os.listdir(self.folder)
        self._remove([n for n in names if UNIT.match(n) or n == PLAN or _temporary(n)])
        self.release(remove=True)
        return index


def _paths(paths: list[str]) -> str:
    return ", ".join(paths) if len(paths) <= 3 else first_and_more(paths)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _read_json(path: Path, name: str):
    try:
        return read_json_file(path, INDEX_LIMIT)
    except ValueError as exc:
        raise LatentFileError(str(exc), path=name) from None


# -- reading -----------------------------------------------------------------------------------


def stored_tensors(settings: dict) -> list[str]:
    """The tensors each shard of an encode with these settings holds, in file order: `latents`,
    and `latents_std` (--store moments), `latents_flip` (--flip), `latents_flip_std` (both)."""
    moments, flip = settings.get("store") == "moments", bool(settings.get("flip"))
    wanted = {"latents": True, "std": moments, "flip": flip, "flip_std": flip and moments}
    return [STORED[field] for field, on in wanted.items() if on]


_STORAGE_NAMES = {code: name for name, code in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class ShardFacts:
    """What a shard says of itself (its header, or the file as read), for the index's word."""

    fingerprint: str
    sources: object  # a list of names, as the index has them, or anything else
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (STORAGE dtype name, shape)
    labels: tuple[int, ...] | None  # the shape of its int64 labels; (-1,) for other labels

    @classmethod
    def of_header(cls, header: ShardHeader) -> ShardFacts:
        metadata = header.metadata
        try:
            sources = json.loads(metadata.get("sources", "null"))
        except ValueError:
            sources = None
        tensors = {
            name: (_STORAGE_NAMES.get(span.dtype, span.dtype), span.shape)
            for name, span in header.tensors.items()
            if name in STORED.values()
        }
        labels = header.tensors.get("labels")
        if labels is not None:
            labels = labels.shape if labels.dtype == "I64" else (-1,)
        return cls(metadata.get("fingerprint", ""), sources, tensors, labels)

    @classmethod
    def of_file(cls, latents: LatentFile) -> ShardFacts:
        tensors = {n: (latents.dtype, tuple(t.shape)) for n, t in latents.stored().items()}
        labels = latents.labels
        if labels is not None:
            labels = tuple(labels.shape) if labels.dtype == torch.int64 else (-1,)
        return cls(latents.fingerprint or "", latents.sources, tensors, labels)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


class LatentFolder:
    """A finished latent folder: its shards checked against its index, and read two ways.

    For aecli's commands, shard by shard: `for latents in folder` yields each shard as a
    LatentFile (every tensor float32), `read`, `select`. For training, as a PyTorch map-style
    dataset of its latents (`from aecli import LatentFolder`): `len(folder)` latents,
    `folder[i]` a dict of `latents` (and `latents_std`, `latents_flip`, `latents_flip_std`
    where the encode stored them), `label` (an int or None) and `source` (its input's name);
    `folder.batches(...)` yields whole batches. These tensors come in the dtype the folder
    stores (`encode --dtype`): bfloat16 latents stay bfloat16, a trainer calls .float().

    Opening reads index.json and each shard's header, never its tensor data; a shard that is
    not what the index says (cut short, from another encode, another dtype or count) is refused
    in one line naming it, and a shard replaced since is checked again before it is read.
    Rows are read straight into each batch's arrays, nothing of a shard mapped (see
    aecli.io.shard_files), so resident memory stays flat whatever the folder's size.
    """

    def __init__(self, path: Path, index: FolderIndex):
        self.path, self.index, self.shards = path, index, index.shards
        self.name = str(path)
        self.count = sum(e.count for e in self.shards)
        self.fingerprint: str | None = index.fingerprint or None
        self.class_names = index.class_names
        self.settings = index.settings
        self.scaling = _scaling(self.settings.get("scaling"), self.name)
        self.dtype: str = self.settings.get("dtype") or "float32"  # a STORAGE name
        self.tensors = stored_tensors(self.settings)  # what every shard holds
        self.starts = [0]
        for entry in self.shards:
            self.starts.append(self.starts[-1] + entry.count)
        self._starts = np.array(self.starts, np.int64)
        self.headers: list[ShardHeader] = []
        self._maps: ShardFiles | None = None
        self._shape_numbers: dict[tuple[int, ...], np.ndarray] | None = None

    @classmethod
    def open(cls, path: str | Path) -> LatentFolder:
        """The folder's index, and each shard's header, checked; one line for a folder that is
        not (yet) one, or a shard that is not what the index says."""
        path = Path(path)
        writer = writer_process(path)
        if writer is not None and not (path / INDEX).is_file():
            raise LatentFileError(busy(writer), path=path)
        if not (path / INDEX).is_file():
            if (path / PLAN).is_file():
                raise LatentFileError(
                    f"an unfinished encode (no {INDEX} yet): finish it by running the same "
                    "`aecli encode` with --resume",
                    path=path,
                )
            raise LatentFileError(
                f"a folder without {INDEX}: not a latent folder from `aecli encode -o DIR/`",
                path=path,
            )
        where = str(path / INDEX)
        raw = _read_json(path / INDEX, where)
        if not isinstance(raw, dict) or raw.get("format") != FOLDER_FORMAT:
            raise LatentFileError("not an aecli latent folder index", path=where)
        try:
            index = FolderIndex.model_validate(raw)
        except ValidationError as exc:
            raise LatentFileError(f"damaged index ({record_problem(exc)})", path=where) from None
        if not index.shards:
            raise LatentFileError("holds no latents (every input failed)", path=where)
        folder = cls(path, index)
        if not isinstance(folder.dtype, str) or folder.dtype not in STORAGE:
            raise LatentFileError(
                f"damaged index (its dtype {str(folder.dtype)[:20]!r} is not one of "
                f"{', '.join(STORAGE)})",
                path=where,
            )
        if index.count != folder.count:
            raise LatentFileError(
                f"damaged index (its count {index.count:,} is not its shards' {folder.count:,})",
                path=where,
            )
        folder.headers = [folder._checked_header(entry) for entry in folder.shards]
        return folder

    def _checked_header(self, entry: ShardEntry) -> ShardHeader:
        """A shard's header, read (not its tensors) and checked against the index's entry."""
        path = self.path / entry.file
        header = read_shard_header(path)
        ours = header is not None and header.metadata.get("format") == FORMAT
        if ours:
            problem = self._disagreement(entry, ShardFacts.of_header(header))
            if problem is not None:
                raise LatentFileError(problem, path=path)
        size = header.size if header is not None else _size(path)
        if size != entry.bytes:
            what = "cut short" if (size or 0) < entry.bytes else "damaged"
            raise LatentFileError(
                f"{size or 0:,} bytes, the index says {entry.bytes:,}: {what} or replaced",
                path=path,
            )
        if not ours:
            raise LatentFileError(
                "not an aecli latent file (no safetensors header naming aecli's latent format)",
                path=path,
            )
        if max(span.end for span in header.tensors.values()) > header.size:
            raise LatentFileError("damaged (its tensors reach past the end of the file)", path=path)
        return header

    def _disagreement(self, entry: ShardEntry, facts: ShardFacts) -> str | None:
        """How a shard differs from the index's entry for it, in words; None where it agrees."""
        another = "a shard of another encode"
        if facts.fingerprint != entry.fingerprint:
            return (
                f"written by model {facts.fingerprint or 'unknown'}, the index's by model "
                f"{entry.fingerprint}: {another}"
            )
        if set(facts.tensors) != set(self.tensors):
            return (
                f"holds {', '.join(facts.tensors) or 'no latents'}, the index's encode stored "
                f"{', '.join(self.tensors)}: {another}"
            )
        expected = (entry.count, *entry.shape)
        for name, (dtype, shape) in facts.tensors.items():
            if shape != expected:
                return (
                    f"holds {shape[0] if shape else 0} {name} of shape {_shape(shape[1:])}, the "
                    f"index says {entry.count} of shape {_shape(entry.shape)}"
                )
            if dtype != self.dtype:
                return (
                    f"stores its {name} as {dtype}, the index says {self.dtype} "
                    f"(encode --dtype): {another}"
                )
        if facts.sources != entry.sources:
            return f"its source names differ from the index's: {another}"
        if facts.labels is None and entry.labels is not None:
            return "holds no labels, the index lists them"
        if facts.labels is not None and entry.labels is None:
            return "holds labels, the index lists none"
        if facts.labels is not None and facts.labels != (entry.count,):
            return "damaged (its labels are not one int64 per latent)"
        return None

    @property
    def shapes(self) -> dict[tuple[int, ...], int]:
        found: dict[tuple[int, ...], int] = {}
        for entry in self.shards:
            found[entry.shape] = found.get(entry.shape, 0) + entry.count
        return found

    @property
    def sources(self) -> list[str]:
        return [s for entry in self.shards for s in entry.sources]

    def disk_bytes(self) -> int:
        return sum(e.bytes for e in self.shards) + (_size(self.path / INDEX) or 0)

    def read(self, entry: ShardEntry) -> LatentFile:
        """One shard as a latent file (every tensor float32), checked against what the index
        says of it: its header before it is read, the file as read after."""
        path = self.path / entry.file
        self._checked_header(entry)  # by its size, so never read past what the index says
        latents = read_latents(path)
        problem = self._disagreement(entry, ShardFacts.of_file(latents))
        if problem is not None:
            raise LatentFileError(problem, path=path)
        latents.name = str(path)
        return latents

    def __iter__(self) -> Iterator[LatentFile]:
        """Each shard as a latent file, in order (not the latents one by one: see `batches`)."""
        for entry in self.shards:
            yield self.read(entry)

    # -- a PyTorch dataset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, number: int) -> dict:
        """Latent `number` (negative counts from the end): its tensors, `label` and `source`."""
        number = operator.index(number)
        if not -self.count <= number < self.count:
            raise IndexError(f"latent {number} of {self.name}, which holds {self.count}")
        batch = self._batch(np.array([number % self.count], np.int64))
        item = {name: batch[name][0] for name in self.tensors}
        return {**item, "label": batch["labels"][0], "source": batch["sources"][0]}

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        epoch: int = 0,
    ) -> Iterator[dict]:
        """This process's batches of one epoch: dicts of stacked tensors (`latents`, and the
        other stored tensors: (B, C, H, W) in the stored dtype), `labels` (a list of int or
        None) and `sources` (a list of names). See `batch_numbers` for which latents, in what
        order; each batch is read shard by shard, one copy of its rows out of each."""
        plan = self.batch_numbers(
            batch_size, shuffle, seed, rank=rank, world_size=world_size, drop_last=drop_last,
            epoch=epoch,
        )  # fmt: skip
        return (self._batch(numbers) for numbers in plan)

    def batch_numbers(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        epoch: int = 0,
    ) -> list[np.ndarray]:
        """The latent numbers of each batch `batches` gives this process, each batch sorted.

        Every batch holds latents of one shape: the latents are grouped by shape, shuffled
        within each shape, cut into batches, and the batches shuffled (without `shuffle`:
        in folder order). The order comes from numpy's default_rng([seed, epoch]) alone, so a
        resumed training that passes the same seed and epoch sees the same batches. Process
        `rank` of `world_size` (default: torchrun's RANK and WORLD_SIZE, else 0 and 1) takes
        every world_size-th batch: the processes' batches are disjoint and together cover
        the folder once. Without `drop_last`, a shape's last batch may be short and some
        processes may get one batch more than others (then a DDP training's last all-reduce
        waits for ever); with it, each shape's short batch is left out, and as many whole
        batches as keep every process at the same number, a different few each epoch."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}: give a whole number from 1")
        rank, world_size = _process(rank, world_size)
        rng = np.random.default_rng([seed, epoch])
        plan = []
        for numbers in self._by_shape().values():
            if shuffle:
                numbers = rng.permutation(numbers)
            stop = len(numbers) - len(numbers) % batch_size if drop_last else len(numbers)
            plan += [np.sort(numbers[i : i + batch_size]) for i in range(0, stop, batch_size)]
        if shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        if drop_last:
            plan = plan[: len(plan) - len(plan) % world_size]
        return plan[rank::world_size]

    def _by_shape(self) -> dict[tuple[int, ...], np.ndarray]:
        """The latent numbers of each shape, in folder order."""
        if self._shape_numbers is None:
            runs: dict[tuple[int, ...], list[np.ndarray]] = {}
            for shard, entry in enumerate(self.shards):
                start = self.starts[shard]
                runs.setdefault(entry.shape, []).append(np.arange(start, start + entry.count))
            self._shape_numbers = {shape: np.concatenate(r) for shape, r in runs.items()}
        return self._shape_numbers

    def _batch(self, numbers: np.ndarray) -> dict:
        """The latents with these numbers (sorted, of one shape) as a batch, read shard by
        shard: each shard's rows copied straight into the batch's arrays, one fancy index per
        shard and tensor."""
        shards = np.searchsorted(self._starts, numbers, side="right") - 1
        cuts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(numbers)]
        shape = self.shards[int(shards[0])].shape
        dtype = NUMPY_DTYPES[SAFETENSORS_DTYPES[self.dtype]]
        arrays = {name: np.empty((len(numbers), *shape), dtype) for name in self.tensors}
        labels, sources = [], []
        if self._maps is None:
            self._maps = ShardFiles(self._map)
        for a, b in itertools.pairwise(cuts):
            shard = int(shards[a])
            entry, rows = self.shards[shard], numbers[a:b] - self.starts[shard]
            self._maps[shard].take(rows, {name: array[a:b] for name, array in arrays.items()})
            picked = rows.tolist()
            sources += [entry.sources[row] for row in picked]
            found = entry.labels
            labels += [None] * len(picked) if found is None else [found[row] for row in picked]
        batch = {name: torch.from_numpy(array) for name, array in arrays.items()}
        if self.dtype == "bfloat16":  # numpy has no bfloat16: its bits, viewed
            batch = {name: tensor.view(torch.bfloat16) for name, tensor in batch.items()}
        return {**batch, "labels": labels, "sources": sources}

    def _map(self, shard: int) -> ShardFile:
        """Shard `shard` opened, checked again first where the file changed since."""
        entry, header = self.shards[shard], self.headers[shard]
        path = self.path / entry.file
        if file_identity(path) != header.identity:
            header = self.headers[shard] = self._checked_header(entry)
        return ShardFile(path, header, self.tensors)

    def __getstate__(self) -> dict:
        """Pickled (DataLoader workers that spawn) without its open shards: each process opens
        its own."""
        return {**self.__dict__, "_maps": None}

    # -- picking latents for aecli's commands

    def locate(self, selector: str, option: str = "--select") -> int:
        """A latent's number in the folder from its source name, else its number (0-based;
        negative counts from the end)."""
        for shard, entry in enumerate(self.shards):
            if selector in entry.sources:
                return self.starts[shard] + entry.sources.index(selector)
        if re.fullmatch(r"\s*-?\d+\s*", selector):
            number = int(selector)
            number = number + self.count if number < 0 else number
            if not 0 <= number < self.count:
                raise UsageError(
                    f"{option} {selector}: {self.name} holds latents 0 to {self.count - 1}"
                )
            return number
        raise UsageError(
            f"{option} {selector}: no latent of that source in {self.name} (give a source name "
            "as the index lists it, or a number from 0)"
        )

    def select(self, numbers: list[int]) -> LatentFile:
        """The latents with these numbers, in this order, as one latent file (one shape)."""
        wanted: dict[int, list[int]] = {}
        for number in numbers:
            wanted.setdefault(bisect.bisect_right(self.starts, number) - 1, []).append(number)
        rows: dict[int, tuple] = {}
        for shard, found in wanted.items():
            latents = self.read(self.shards[shard])
            for number in found:
                row = number - self.starts[shard]
                label = None if latents.labels is None else latents.labels[row]
                rows[number] = (latents.rows(row), latents.sources[row], label, latents.dtype)
        shapes = {tuple(rows[n][0]["latents"].shape) for n in numbers}
        if len(shapes) > 1:
            raise UsageError(
                f"--select: the chosen latents have {len(shapes)} shapes "
                f"({', '.join('x'.join(map(str, s)) for s in sorted(shapes))}); choose latents "
                "of one shape"
            )
        labels = [rows[n][2] for n in numbers]
        stored = {  # latents, and std and flip where every chosen row has them
            field: torch.stack([rows[n][0][field] for n in numbers])
            for field in STORED
            if all(rows[n][0][field] is not None for n in numbers)
        }
        return LatentFile(
            labels=None if any(label is None for label in labels) else torch.stack(labels),
            fingerprint=self.fingerprint,
            sources=[rows[n][1] for n in numbers],
            class_names=self.class_names,
            name=self.name,
            scaling=self.scaling,
            dtype=rows[numbers[0]][3],
            **stored,
        )


def _process(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank and the number of processes: as given, else torchrun's RANK and
    WORLD_SIZE, else 0 of 1."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} processes: give 0 <= rank < world_size")
    return rank, world_size


def _scaling(raw, name: str) -> LatentScaling | None:
    if raw is None:
        return None
    try:
        return LatentScaling.from_record(raw)
    except ValueError:
        raise LatentFileError(
            "damaged index (its scaling is not finite factors with positive scales)", path=name
        ) from None


def write_latent_folder(
    folder: Path,
    latents: LatentFile,
    *,
    weights: str,
    settings: dict,
    shard_size: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Latents already in memory (`aecli sample --latents-out DIR/`) as a latent folder, in
    shards of `shard_size` (default about SHARD_BYTES each). Returns the index."""
    count = len(latents)
    per_latent = 4 * math.prod(latents.latents.shape[1:])
    shard_size = shard_size or max(1, min(1 << 20, SHARD_BYTES // per_latent))
    starts = range(0, count, shard_size)
    plan = Plan(
        latents.fingerprint or "",
        weights,
        {**settings, "shard_size": shard_size},
        count,
        "",
        len(starts),
        latents.class_names,
    )
    writer = FolderWriter(folder, plan)
    writer.make_ready(writer.check(resume=False, overwrite=overwrite, force=False))
    for unit, start in enumerate(starts):
        part = slice(start, start + shard_size)
        labels = None if latents.labels is None else latents.labels[part]
        sources = latents.sources[part] if latents.sources else None
        chunk = LatentFile(
            labels=labels, fingerprint=latents.fingerprint, sources=sources,
            class_names=latents.class_names, scaling=latents.scaling, dtype=latents.dtype,
            **latents.rows(part),
        )  # fmt: skip
        writer.write_unit(unit, [chunk], [])
    return writer.finish([])


def folder_facts(path: Path) -> dict:
    """What `aecli info DIR/` says of a latent folder, finished or not."""
    if not (path / INDEX).is_file():
        raw = _read_json(path / PLAN, str(path / PLAN))
        if not isinstance(raw, dict) or raw.get("format") != FOLDER_FORMAT:
            raise LatentFileError("not an aecli latent folder record", path=path / PLAN)
        try:
            plan = PlanRecord.model_validate(raw)
        except ValidationError as exc:
            raise LatentFileError(f"damaged ({record_problem(exc)})", path=path / PLAN) from None
        units = sum(1 for n in os.listdir(path) if UNIT.match(n))
        return {
            "kind": "latent folder",
            "finished": False,
            "writer": writer_process(path),
            "fingerprint": plan.fingerprint,
            "weights": plan.weights,
            "variational": plan.variational,
            "settings": plan.settings,
            "inputs": plan.inputs,
            "units_done": units,
            "units": plan.units,
            "bytes": sum(_size(path / n) or 0 for n in os.listdir(path) if SHARD.match(n)),
        }
    folder = LatentFolder.open(path)
    index = folder.index
    return {
        "kind": "latent folder",
        "finished": True,
        "count": folder.count,
        "shapes": [{"shape": list(s), "count": n} for s, n in folder.shapes.items()],
        "shards": len(folder.shards),
        "fingerprint": folder.fingerprint,
        "weights": index.weights,
        "variational": index.variational,
        "settings": index.settings,
        "class_names": folder.class_names,
        "labels": all(e.labels is not None for e in folder.shards),
        "failures": len(index.failures),
        "bytes": folder.disk_bytes(),
        "aecli_version": index.aecli_version,
    }

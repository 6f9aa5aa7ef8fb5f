"""Safetensors shards read in place: a shard's header from its first bytes (never its tensor
data), and rows of its tensors copied out of a read-only memory map.

A mapped page that was read counts in the process's resident memory until it is unmapped, so
a loop over a whole folder would grow by the folder's size; `ShardMap.take` hands the pages of
what it read back to the kernel (MADV_DONTNEED: the file's pages stay in the page cache, shared
and reclaimable), which keeps resident memory flat. The price: a page read again is mapped
again, once per batch where shuffled batches each touch most of a shard (about 1 to 2 us per
latent on the dev machine, where the kernel maps a shard 2 MiB at a time).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aecli.errors import os_reason
from aecli.io.latents import LatentFileError

# Bytes of one tensor read between two releases: about what the process holds of a shard
RELEASE_BYTES = 32 << 20
# What reading a byte may map around it: fault-around's 64 KiB, or a whole large folio of the
# page cache (ext4 and xfs have them: up to a 2 MiB huge page, mapped at once)
MAPPED_AROUND = 2 << 20
HEADER_LIMIT = 256 << 20  # bytes of JSON header read at most (a shard of 2^20 latents' names)
# safetensors' dtypes as numpy reads them (bfloat16 as its bits: torch views them as bfloat16)
NUMPY_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<i2"),
    "I64": np.dtype("<i8"),
}


@dataclass(frozen=True)
class TensorSpan:
    """One tensor of a shard: its safetensors dtype, shape and bytes [start, end) in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says, and which file said it (st_dev, st_ino, st_size and
    st_mtime_ns: a file replaced since is read again before it is mapped)."""

    tensors: dict[str, TensorSpan]
    metadata: dict[str, str]
    size: int
    identity: tuple[int, int, int, int]


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """A file's identity as ShardHeader records it, now; None where it cannot be seen."""
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of a regular file (a FIFO is opened without blocking, then
    refused), and its status; one line for a file that is missing, not a file or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LatentFileError("file not found", path=path) from None
    except OSError as exc:
        raise LatentFileError(f"cannot read: {os_reason(exc)}", path=path) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise LatentFileError("not a regular file", path=path)
    return fd, info


def read_shard_header(path: Path) -> ShardHeader | None:
    """The shard's header, read and checked for layout alone (each tensor's bytes are its
    shape times its dtype's size; whether they lie inside the file is the caller's to check,
    after the file's size); None where the file does not begin with a safetensors header at
    all. Raises for a file that cannot be opened or whose header is malformed."""
    fd, info = _open_regular(path)
    try:
        prefix = os.pread(fd, 8, 0)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if not 2 <= length <= min(HEADER_LIMIT, info.st_size - 8):
            return None
        text = os.pread(fd, length, 8)
    except OSError as exc:
        raise LatentFileError(f"cannot read: {os_reason(exc)}", path=path) from None
    finally:
        os.close(fd)
    if not text.startswith(b"{"):
        return None
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LatentFileError("damaged latent file (its metadata is not text)", path=path)
    data = 8 + length
    tensors = {}
    for name, entry in raw.items():
        span = _span(entry, data)
        if span is None:
            raise LatentFileError(
                f"damaged latent file (its header's {name[:40]!r} entry is malformed)", path=path
            )
        tensors[name] = span
    return ShardHeader(tensors, metadata, info.st_size, _identity(info))


def _span(entry, data: int) -> TensorSpan | None:
    """A header's tensor entry, where its dtype is one a latent file holds and its byte range
    is its shape's size; else None."""
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    ints = [*(shape or []), *(offsets or [])] if isinstance(shape, list) else None
    if dtype not in NUMPY_DTYPES or not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if ints is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
        return None
    begin, end = offsets
    if min(ints, default=0) < 0 or end - begin != math.prod(shape) * NUMPY_DTYPES[dtype].itemsize:
        return None
    return TensorSpan(dtype, tuple(shape), data + begin, data + end)


class ShardMap:
    """One shard mapped read-only: its tensors as numpy arrays over the map, rows copied out of
    them, and the pages read handed back."""

    def __init__(self, path: Path, header: ShardHeader, tensors: list[str]):
        fd, info = _open_regular(path)
        try:
            if _identity(info) != header.identity:
                raise LatentFileError("replaced while it was being read", path=path)
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.arrays = {}
        for name in tensors:
            span = header.tensors[name]
            dtype = NUMPY_DTYPES[span.dtype]
            array = np.frombuffer(self.map, dtype, math.prod(span.shape), span.start)
            self.arrays[name] = array.reshape(span.shape)
        self.spans = {name: header.tensors[name] for name in tensors}

    def take(self, rows: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Rows (sorted numbers in the shard) of each tensor into `out` (name -> an array of as
        many rows), one copy each; the pages read are handed back after every RELEASE_BYTES of
        a tensor, with what reading them may have mapped around them."""
        for name, target in out.items():
            span, array = self.spans[name], self.arrays[name]
            row_bytes = (span.end - span.start) // span.shape[0]
            windows = rows // max(1, RELEASE_BYTES // row_bytes)
            cuts = [0, *(np.flatnonzero(np.diff(windows)) + 1).tolist(), len(rows)]
            for a, b in itertools.pairwise(cuts):
                # mode="clip" copies straight into `out` (mode="raise" copies through a
                # buffer); the rows are the folder's own numbers, in range
                np.take(array, rows[a:b], axis=0, out=target[a:b], mode="clip")
                start = span.start + int(rows[a]) * row_bytes
                self._release(start, span.start + (int(rows[b - 1]) + 1) * row_bytes)

    def _release(self, start: int, end: int) -> None:
        """Hand back the pages of bytes [start, end) of the file, and those around them that
        reading them may have mapped."""
        start = max(0, start - MAPPED_AROUND)
        start -= start % mmap.PAGESIZE
        end = min(len(self.map), end + MAPPED_AROUND)
        self.map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self.arrays.clear()
        with contextlib.suppress(BufferError):  # a caller holds a view: unmapped when it goes
            self.map.close()


def open_limit() -> int:
    """How many shards to keep mapped at once: each map holds a file descriptor open."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 1024 if soft == resource.RLIM_INFINITY else soft
    return max(8, min(1024, soft // 4))


class ShardMaps:
    """The shards of a folder mapped as they are read, the least recently used unmapped beyond
    `limit`; `open_map(number)` maps shard `number` (checking it again where it changed)."""

    def __init__(self, open_map: Callable[[int], ShardMap], limit: int | None = None):
        self.open_map, self.limit = open_map, limit or open_limit()
        self.maps: OrderedDict[int, ShardMap] = OrderedDict()

    def __getitem__(self, number: int) -> ShardMap:
        found = self.maps.get(number)
        if found is not None:
            self.maps.move_to_end(number)
            return found
        while len(self.maps) >= self.limit:
            self.maps.popitem(last=False)[1].close()
        found = self.maps[number] = self.open_map(number)
        return found

    def close(self) -> None:
        while self.maps:
            self.maps.popitem()[1].close()

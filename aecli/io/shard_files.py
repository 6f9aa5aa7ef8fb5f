"""Safetensors shards read in place: a shard's header from its first bytes (never its tensor
data), and rows of its tensors read straight into a batch's arrays.

Rows are read with `os.preadv`, one call per run of consecutive rows, into the batch's own
memory: nothing of the file is mapped, so resident memory holds the batch and no more, whatever
the folder's size (the file's pages stay in the kernel's page cache, shared and reclaimable).
A memory map would count every page read in the process's resident memory until unmapped, and
handing pages back (MADV_DONTNEED) costs a fault per page read again: the kernel maps a shard
up to 2 MiB at a time, so a shuffled epoch read that way ran at 0.65 times a plain `np.memmap`
loop on the dev machine, where `preadv` keeps its speed. And a shard cut short while it is
read is a short read, one line, not a SIGBUS.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aecli.errors import os_reason
from aecli.io.latents import LatentFileError

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


class ShardFile:
    """One shard open for reading: rows of its tensors read into arrays."""

    def __init__(self, path: Path, header: ShardHeader, tensors: list[str]):
        self.path = path
        self.fd, info = _open_regular(path)
        if _identity(info) != header.identity:
            os.close(self.fd)
            raise LatentFileError("replaced while it was being read", path=path)
        self.spans = {name: header.tensors[name] for name in tensors}

    def take(self, rows: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Rows (sorted numbers in the shard) of each tensor into `out` (name -> a C-ordered
        array of as many rows), one `preadv` per run of consecutive rows; a file shorter than
        its header says is one line."""
        numbers = rows.tolist()
        runs = []  # (first position in `rows`, past its last, its first row)
        for position, row in enumerate(numbers):
            if runs and row == numbers[position - 1] + 1:
                runs[-1][1] = position + 1
            else:
                runs.append([position, position + 1, row])
        read, fd = os.preadv, self.fd
        for name, target in out.items():
            span = self.spans[name]
            size = (span.end - span.start) // span.shape[0]  # bytes of one row
            memory = memoryview(target.reshape(-1).view(np.uint8))
            got = 0
            for a, b, row in runs:
                got += read(fd, [memory[a * size : b * size]], span.start + row * size)
            if got != len(numbers) * size:
                raise LatentFileError(
                    "cut short while it was being read (shorter than its header says)",
                    path=self.path,
                )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_limit() -> int:
    """How many shards to keep open at once: each holds a file descriptor."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 1024 if soft == resource.RLIM_INFINITY else soft
    return max(8, min(1024, soft // 4))


class ShardFiles:
    """The shards of a folder opened as they are read, the least recently used closed beyond
    `limit`; `open_map(number)` opens shard `number` (checking it again where it changed)."""

    def __init__(self, open_map: Callable[[int], ShardFile], limit: int | None = None):
        self.open_map, self.limit = open_map, limit or open_limit()
        self.maps: OrderedDict[int, ShardFile] = OrderedDict()

    def __getitem__(self, number: int) -> ShardFile:
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

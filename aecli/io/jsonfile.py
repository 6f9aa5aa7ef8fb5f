"""Files anyone may have written (an index, a diffusers config.json, a run's state.json and
metrics.jsonl): opened only where they are regular files, read within limits, every failure one
line. A FIFO put in a file's place would block its reader forever, a device never end."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from aecli.errors import first_line, os_reason


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words (`a FIFO`), for refusals."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"


def regular_file(path: Path) -> bool:
    """Whether there is a file at `path` (links followed): False where there is none,
    ValueError with the one-line reason where something else is in its place."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ValueError(f"cannot read: {os_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"not a regular file ({file_kind(mode)})")
    return True


def open_regular(path: Path) -> IO[bytes]:
    """`path` opened for reading, binary; without waiting where it is not a regular file (a
    FIFO opens at once with O_NONBLOCK, and is refused). ValueError with the one-line reason
    where it cannot be read; FileNotFoundError where there is nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except OSError as exc:
        raise ValueError(f"cannot read: {os_reason(exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"not a regular file ({file_kind(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


CHUNK = 16 << 20  # bytes read at a time: a damaged file is refused before it is read whole


def read_json_file(path: Path, limit: int) -> Any:
    """The JSON value in `path`; ValueError with the one-line reason where it cannot be had:
    missing, not a regular file, unreadable, over `limit` bytes, or damaged (bad bytes, bad
    JSON, nesting too deep for Python)."""
    chunks, size = [], 0
    try:
        with open_regular(path) as handle:
            while size <= limit and (chunk := handle.read(min(CHUNK, limit + 1 - size))):
                if b"\0" in chunk:  # never in JSON: a file of NUL bytes (sparse, or a crash's)
                    raise ValueError(f"damaged: a NUL byte at byte {size + chunk.index(0):,}")
                chunks.append(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise ValueError("missing") from None
    except OSError as exc:
        raise ValueError(f"cannot read: {os_reason(exc)}") from None
    data = b"".join(chunks)
    if len(data) > limit:
        raise ValueError(f"larger than {limit:,} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"damaged: {first_line(exc)[:200]}") from None


def read_lines(handle: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of a JSON-lines file, without their newline, each of at most `limit` bytes.
    A longer line (one no writer of the file makes, such as gigabytes of NUL bytes) ends the
    reading: None is yielded for it, and nothing of it or after it is read."""
    while line := handle.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            yield None
            return
        yield line.rstrip(b"\n")

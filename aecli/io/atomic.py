"""Atomic file writes: a temporary file in the same folder, flushed, fsynced, then os.replace.

The temporary file is created with mode 0666 less the umask, as `open()` would create the file
itself (mkstemp's 0600 would make every output private to its owner).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from aecli.errors import WriteError, os_reason

TEMP_SUFFIX = ".tmp"


# `.NAME.aecli-<8 hex digits>.tmp`: a name no one else writes, so that cleaning a folder never
# removes a user's file (`.notes.tmp`, `.draft.deadbeef.tmp`)
_TEMP = re.compile(r"^\..+\.aecli-[0-9a-f]{8}\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of aecli's temporary files."""
    return bool(_TEMP.match(name))


def temp_target(name: str) -> str:
    """The name a temporary file was to become (`.a.png.aecli-0123abcd.tmp` -> `a.png`)."""
    return name[1:].rsplit(".", 2)[0]


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files that atomic writes into `folder` left behind (a killed process)."""
    return sorted(p for p in folder.glob(f".*{TEMP_SUFFIX}") if _TEMP.match(p.name))


def _create(path: Path) -> tuple[int, Path]:
    """A new file `.NAME.aecli-<random>.tmp` next to `path`, opened for writing."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.aecli-{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` so that a reader (or a killed process) never sees a partial file.

    `durable` also fsyncs the file and its folder, so that the write survives a power cut;
    batch outputs (thousands of PNGs) skip that cost. An OS error (a full disk, no permission)
    is a WriteError naming `path`.
    """
    atomic_write_parts(path, [data], durable=durable)


def atomic_write_parts(
    path: str | Path, parts: Iterable[bytes | memoryview], *, durable: bool = True
) -> None:
    """`atomic_write_bytes` of the parts one after another, never joined in memory (a latent
    shard's header, then its tensors' own memory)."""
    path = Path(path)
    if _into_stream(path, parts):
        return
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create(path)
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write: {os_reason(exc)}", path=path) from exc
        raise
    if not durable:
        return
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def is_stream(path: str | Path) -> bool:
    """Whether `path` is a character device or a FIFO (links followed): an output written
    into, as a shell's `>` does, never replaced (`-o /dev/null`)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _into_stream(path: Path, parts: Iterable[bytes | memoryview]) -> bool:
    """Write into a character device or FIFO at `path` (True), refuse another kind of special
    file, or leave a regular file (or none) to the atomic write (False)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return False
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        raise WriteError("is a block device or a socket; aecli never replaces one", path=path)
    try:
        with open(path, "wb", buffering=0) as handle:  # no truncation, no rename: into it
            for part in parts:
                handle.write(part)
    except OSError as exc:
        raise WriteError(f"cannot write: {os_reason(exc)}", path=path) from exc
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))

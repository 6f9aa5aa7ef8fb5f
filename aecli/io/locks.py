"""Advisory folder locks: one process writes a run folder or a latent folder at a time.

A POSIX record lock (fcntl.lockf) on a small file in the folder, held for the life of the work:
the kernel lets go of it when the process ends however it ends, so a killed run never blocks its
folder, and forked children (DataLoader workers) do not inherit it, so none that outlives a
SIGKILLed parent keeps holding it. The file holds the holder's process id, for the refusal.

A POSIX lock has one trap: closing any descriptor of the file in the holding process lets go of
the lock. So this process never opens a file it holds a lock on to ask about it: `lock_holder`
answers from `_HELD` for those.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from aecli.errors import UsageError

_HELD: dict[tuple[int, int], FolderLock] = {}  # this process's locks, by the file's (dev, inode)


class FolderLock:
    """The lock on `folder/name`, taken at construction or refused in one line."""

    def __init__(self, folder: Path, name: str, refusal: str):
        """`refusal`: the one line's start, e.g. `--out runs/x: another aecli train is running
        in this folder`; the holder's process id is added to it."""
        self.path = folder / name
        fd = _open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # no locks here (ENOLCK, ...)
                raise UsageError(f"cannot lock: {exc.strerror}", path=self.path) from None
            raise UsageError(
                refusal + (f" (process {holder})" if holder.isdigit() else "")
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd: int | None = fd
        info = os.fstat(fd)
        self._key = (info.st_dev, info.st_ino)
        _HELD[self._key] = self

    def release(self, *, remove: bool = False) -> None:
        """Let go (and remove the file, where the folder's work is finished)."""
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        _HELD.pop(self._key, None)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _open(path: Path, flags: int) -> int:
    """A descriptor of the lock file `path`, which must be a regular file: a symbolic link
    (which could point at a file of the user's that locking would truncate), a folder or a
    FIFO put in its place is refused in one line."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise UsageError("not a lock file aecli wrote (remove it)", path=path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError("not a lock file aecli wrote (remove it)", path=path)
    return fd


_FLOCK = "hhqqixxxx"  # struct flock on Linux: type, whence, start, len, pid (padded to 32)


def lock_holder(path: Path) -> int | None:
    """The process id holding the lock on `path` (this process's own where it holds it), or
    None where the lock is free, there is no lock file, or it cannot be asked (not Linux)."""
    if not hasattr(fcntl, "F_GETLK") or os.uname().sysname != "Linux":
        return None
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if (info.st_dev, info.st_ino) in _HELD:  # opening it would let go of this process's lock
        return os.getpid()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None

"""Advisory folder locks: one process writes a run folder or a latent folder at a time.

A POSIX record lock (fcntl.lockf) on a small file in the folder, held for the life of the work:
the kernel lets go of it when the process ends however it ends, so a killed run never blocks its
folder, and forked children (DataLoader workers) do not inherit it, so none that outlives a
SIGKILLed parent keeps holding it. The file holds the holder's process id, for the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from aecli.errors import UsageError


class FolderLock:
    """The lock on `folder/name`, taken at construction or refused in one line."""

    def __init__(self, folder: Path, name: str, refusal: str):
        """`refusal`: the one line's start, e.g. `--out runs/x: another aecli train is running
        in this folder`; the holder's process id is added to it."""
        self.path = folder / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise UsageError(
                refusal + (f" (process {holder})" if holder.isdigit() else "")
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd: int | None = fd

    def release(self, *, remove: bool = False) -> None:
        """Let go (and remove the file, where the folder's work is finished)."""
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

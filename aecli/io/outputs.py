"""Where a command may write: never onto or into anything it reads, never two outputs onto one
path, never over an existing file without --overwrite, and only where the folders can be made.
All of it is checked before any work starts, so that a refused command has written nothing and
an input is never modified."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from aecli.errors import UsageError, os_reason
from aecli.io.atomic import is_stream


def real(path: str | Path) -> str:
    """The canonical path (symlinks resolved; a symlink loop does not raise)."""
    return os.path.realpath(path)


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies inside it, links resolved."""
    inner, outer = Path(real(path)), Path(real(folder))
    return inner == outer or inner.is_relative_to(outer)


def make_folder(folder: Path, option: str) -> Path | None:
    """Create an output folder now, so that a path that cannot be one is a usage error (exit 2)
    before any work, not a failure after it. Returns the outermost folder it created, if any."""
    created = next((p for p in [*reversed(folder.parents), folder] if not p.exists()), None)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else os_reason(exc)
        raise UsageError(f"{option} {folder}: cannot create this folder: {reason}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(folder) else "permission denied"
        raise UsageError(f"{option} {folder}: cannot write in this folder: {reason}")
    return created


def _read_only(folder: Path) -> bool:
    """Whether `folder` lies on a file system mounted read-only (what the OS would say)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def remove_if_empty(folder: Path, up_to: Path) -> None:
    """Remove `folder` and its parents up to `up_to` (one that make_folder created) where
    they are empty: a command that failed early leaves nothing behind."""
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()  # only ever removes an empty folder
        except OSError:
            return
        if path == up_to:
            return


class OutputGuard:
    """Checks a command's outputs against everything it reads and against each other.

    `reads` are the paths the command was given (weights, images, folders, latent files);
    `files` the files found inside given folders.
    """

    def __init__(self, reads: Iterable[str | Path], files: Iterable[str | Path] = ()):
        given = [Path(p) for p in reads]
        self.folders = [p for p in given if p.is_dir()]
        self.sources = {real(p) for p in given if not p.is_dir()} | {real(p) for p in files}
        self.claimed: dict[str, str] = {}  # real output path -> the option that claimed it

    def check(
        self,
        option: str,
        outputs: list[Path],
        *,
        overwrite: bool,
        out_dir: Path | None = None,
    ) -> None:
        """Refuse (exit 2) outputs of `option` that would modify an input or another output,
        and existing files unless `overwrite`; then create the folders they go into."""
        if out_dir is not None:
            self._refuse_inside_input(option, out_dir)
            self._claim(option, out_dir)
        for output in outputs:
            key = real(output)
            if key in self.sources:
                raise UsageError(
                    f"{option}: {output} is one of this command's inputs; inputs are never "
                    "modified (not even with --overwrite), choose another path"
                )
            if output.is_dir():
                raise UsageError(f"{option} {output}: is a folder, expected a file path")
            if out_dir is None:
                self._refuse_inside_input(option, output)
            self._claim(option, output)
        existing = [o for o in outputs if o.exists() and not is_stream(o)]  # /dev/null: into
        if existing and not overwrite:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise UsageError(
                f"{option}: {existing[0]}{more} already "
                + (
                    "exist; pass --overwrite to replace them"
                    if more
                    else "exists; pass --overwrite to replace it"
                )  # fmt: skip
            )
        for folder in sorted({o.parent for o in outputs} | ({out_dir} if out_dir else set())):
            make_folder(folder, option)

    def _claim(self, option: str, output: Path) -> None:
        """Refuse an output (a file, or a folder an option fills) that another option claimed."""
        key = real(output)
        if key in self.claimed:
            raise UsageError(
                f"{option}: {output} is also the output of {self.claimed[key]}; give the two "
                "outputs different paths"
            )
        self.claimed[key] = option

    def _refuse_inside_input(self, option: str, path: Path) -> None:
        for folder in self.folders:
            if is_within(path, folder):
                raise UsageError(
                    f"{option}: {path} is inside the input folder {folder}; inputs are never "
                    "modified, choose a path outside it"
                )

"""Typed errors that carry what a person needs to fix the problem, and the exit code.

The core raises these; the CLI turns them into one line on stderr (see aecli.cli.app).
"""

from __future__ import annotations

from pathlib import Path


class AecliError(Exception):
    """An error a user can act on: a message, optionally the file it concerns, and an exit code."""

    exit_code = 1
    label = "error"

    def __init__(self, message: str, *, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def lines(self) -> list[str]:
        """What the error says, one line each (one, but for a preset's several problems)."""
        return [str(self)]


def printable(text: str) -> str:
    """Text as a message shows it: control characters (a newline, ESC) escaped, so that one
    message is one line and nothing reaches the terminal as a command."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class UsageError(AecliError):
    """The command was called with something unusable (bad option, file, preset); exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A preset or override is invalid; holds every problem found, one line each."""

    def __init__(self, problems: list[str], *, path: str | Path | None = None):
        super().__init__("\n".join(problems), path=path)
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        prefix = f"{self.path}: " if self.path else ""
        return [prefix + p for p in self.problems]


class DataError(UsageError):
    """A data source cannot be read or does not fit the preset."""


# What `--data` takes, in words (here, with no torch behind it, so that the command line can
# name a missing --data path before torch loads)
DATA_LAYOUTS = (
    "a folder of images (PNG, JPEG, WebP, GIF, BMP, TIFF; subfolders become class labels), "
    "a folder or file of MNIST-format IDX data (*-images-idx3-ubyte[.gz]), a CIFAR-10/100 batch "
    "folder (python or binary version), a .npy / .npz array file, or WebDataset .tar shards (one, "
    "a folder of them, or a brace pattern such as 'shards/{00000..00099}.tar')"
)


def missing_data(path, option: str = "--data") -> DataError:
    """The refusal of a data path that is not there, with what the option takes."""
    return DataError(f"does not exist; {option} takes {DATA_LAYOUTS}", path=path)


class WeightsError(UsageError):
    """A weights file is missing, not aecli's, or damaged."""


class WriteError(AecliError):
    """An output could not be written (disk full, permission, a read-only file system); exit 1."""


def first_and_more(names: list[str]) -> str:
    """`a` or `a and 3 more`: the first of a list of names, for one-line messages."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first non-empty line (its type when it has none)."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def os_reason(exc: OSError) -> str:
    """What went wrong, in the words of the OS (`No space left on device`), without the path."""
    return exc.strerror or str(exc) or type(exc).__name__


class TrainingError(AecliError):
    """Training had to stop (for example a non-finite loss); exit 1."""


class Interrupted(AecliError):
    """The user pressed Ctrl-C; the run was saved and can be resumed; exit 130."""

    exit_code = 130
    label = "interrupted"

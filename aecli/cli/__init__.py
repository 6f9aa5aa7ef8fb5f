"""The `aecli` command line: one module per command over the shared core."""

import os
import sys

import click
import typer

from aecli import CUBLAS_WORKSPACE
from aecli.cli import (  # noqa: F401  (importing a module registers its commands)
    diff,
    export,
    generate,
    inspect,
    latents,
    reconstruct,
    runs,
    train,
)
from aecli.cli.app import app
from aecli.cli.render import print_error


def main() -> None:
    # before anything can run a matrix product on a GPU (a user's own setting stays)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    try:
        code = app(standalone_mode=False)
    except USAGE_ERRORS as exc:  # a bad option value, a missing argument: one line too
        if type(exc).__name__ == "NoArgsIsHelpError":  # `aecli` alone: the help
            exc.show()
        else:
            print_error(usage_line(exc))
        sys.exit(exc.exit_code)
    except ABORTS:
        print_error("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


# Click's usage error, and Typer's copy of Click where it vendors one (Typer 0.22 and later)
USAGE_ERRORS = tuple(
    {click.UsageError, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")}
)
ABORTS = tuple({click.exceptions.Abort, typer.Abort})


def usage_line(exc) -> str:
    """Click's usage error as aecli's one line, with where to read more."""
    context = getattr(exc, "ctx", None)
    command = context.command_path if context is not None else "aecli"
    command = "aecli" + command.split("aecli", 1)[1] if "aecli" in command else command
    return f"{exc.format_message()} (see `{command} --help`)"

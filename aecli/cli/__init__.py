"""The `aecli` command line: one module per command over the shared core."""

import os
import signal
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

# --help lists the commands in the order a user meets them, `train` first
ORDER = ["train", "reconstruct", "encode", "decode", "sample", "interpolate", "diff", "export",
         "presets", "info", "runs", "report"]  # fmt: skip
app.registered_commands.sort(
    key=lambda c: ORDER.index(c.name or c.callback.__name__.replace("_", "-"))
)


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
    if code == 130:  # interrupted, the run saved: a further Ctrl-C must not break the exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    param = getattr(exc, "param", None)
    given = context.params.get("weights") if context is not None else None
    missing = type(exc).__name__ == "MissingParameter" and getattr(param, "name", "") == "inputs"
    if missing and given:
        # `aecli reconstruct photos/ -o out/`: the one path went to WEIGHTS
        return (
            f"no INPUT given: {given} was taken as the WEIGHTS, which come first "
            f"(`{command} WEIGHTS INPUT... -o OUT`; see `{command} --help`)"
        )
    return f"{exc.format_message()} (see `{command} --help`)"

"""The `aecli` command line: one module per command over the shared core."""

import os
import signal
import sys

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
    stats,
    train,
)
from aecli.cli.app import app, interrupted
from aecli.cli.render import print_error

# --help lists the commands in the order a user meets them, `train` first
ORDER = ["train", "reconstruct", "encode", "decode", "sample", "interpolate", "diff", "stats",
         "export", "presets", "info", "runs", "report"]  # fmt: skip
app.registered_commands.sort(
    key=lambda c: ORDER.index(c.name or c.callback.__name__.replace("_", "-"))
)


def main() -> None:
    # before anything can run a matrix product on a GPU (a user's own setting stays)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    args = sys.argv[1:] or ["--help"]  # `aecli` alone: the help, exit 0
    try:
        code = app(args=args, standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        # Ctrl-C while the command line was read, or a second one as an interrupted command
        # returned (which has said so and saved its work)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not interrupted():
            print_error("interrupted")
        sys.exit(130)
    except Exception as exc:
        if not is_click_error(exc):
            raise
        # a bad option value, a missing argument: one line too
        print_error(usage_line(exc))
        sys.exit(exc.exit_code)
    if code == 130:  # interrupted, the run saved: a further Ctrl-C must not break the exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)


def is_click_error(exc: BaseException) -> bool:
    """Whether Click raised this for the command line (a usage error, a bad file option).

    Typer 0.26 and later bundle their own copy of Click and do not export its exception
    classes; older Typers use Click itself. Both raise Click's documented ClickException
    interface, `exit_code` and `format_message()`, which no other error of aecli's has.
    """
    from aecli.errors import AecliError

    return (
        not isinstance(exc, AecliError)
        and isinstance(getattr(exc, "exit_code", None), int)
        and callable(getattr(exc, "format_message", None))
    )


def usage_line(exc) -> str:
    """Click's usage error as aecli's one line, with where to read more."""
    context = getattr(exc, "ctx", None)
    command = context.command_path if context is not None else "aecli"
    command = "aecli" + command.split("aecli", 1)[1] if "aecli" in command else command
    param = getattr(exc, "param", None)
    given = context.params.get("weights") if context is not None else None
    # Click's MissingParameter, the BadParameter of a value not given at all, has a param_type
    missing = (
        isinstance(exc, typer.BadParameter)
        and hasattr(exc, "param_type")
        and getattr(param, "name", "") == "inputs"
    )
    if missing and given:
        # `aecli reconstruct photos/ -o out/`: the one path went to WEIGHTS
        return (
            f"no INPUT given: {given} was taken as the WEIGHTS, which come first "
            f"(`{command} WEIGHTS INPUT... -o OUT`; see `{command} --help`)"
        )
    return f"{exc.format_message()} (see `{command} --help`)"

"""The `aecli` command line: one module per command over the shared core."""

import os
import signal
import sys

import typer

from aecli import CUBLAS_WORKSPACE
from aecli.cli import (
    diff,
    evaluate,
    export,
    generate,
    inspect,
    latents,
    reconstruct,
    runs,
    stats,
    train,
)
from aecli.cli.app import app, epilog, guarded, interrupted
from aecli.cli.render import print_error

# Every command, in the order --help lists them: the order a user meets them, `train` first
COMMANDS = [
    ("train", train.train, train.EXAMPLES),
    ("reconstruct", reconstruct.reconstruct, reconstruct.EXAMPLES),
    ("encode", latents.encode, latents.ENCODE_EXAMPLES),
    ("decode", latents.decode, latents.DECODE_EXAMPLES),
    ("sample", generate.sample, generate.SAMPLE_EXAMPLES),
    ("interpolate", generate.interpolate, generate.INTERPOLATE_EXAMPLES),
    ("diff", diff.diff, diff.EXAMPLES),
    ("eval", evaluate.evaluate, evaluate.EXAMPLES),
    ("stats", stats.stats, stats.EXAMPLES),
    ("export", export.export, export.EXAMPLES),
    ("presets", inspect.presets, inspect.PRESETS_EXAMPLES),
    ("info", inspect.info, inspect.INFO_EXAMPLES),
    ("runs", runs.runs, runs.RUNS_EXAMPLES),
    ("report", runs.report, runs.REPORT_EXAMPLES),
]
for name, command, examples in COMMANDS:
    app.command(name=name, epilog=epilog(examples))(guarded(command))


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
    except typer.TyperException as exc:
        # a bad option value, a missing argument: one line too
        print_error(usage_line(exc))
        sys.exit(exc.exit_code)
    if code == 130:  # interrupted, the run saved: a further Ctrl-C must not break the exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)


def usage_line(exc: typer.TyperException) -> str:
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

"""The Typer application, global options, and the one place errors become exit codes."""

from __future__ import annotations

import functools
import inspect
import os
import signal
from collections.abc import Callable
from typing import Any

import typer

import aecli
from aecli.cli.render import console, print_error

app = typer.Typer(
    name="aecli",
    help="Train convolutional image autoencoders and VAEs, and put them to work.\n\n"
    "Start with [bold]aecli train[/bold]: it trains a small model on built-in data in under a "
    "minute, no download needed.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": os.environ.get("AECLI_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aecli {aecli.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks instead of one-line errors."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Global options."""
    _state["debug"] = debug  # set on every call: one process may run several commands


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command, turning aecli errors into one line on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from aecli.errors import AecliError, Interrupted

        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except AecliError as exc:
            if isinstance(
                exc, Interrupted
            ):  # the run is saved; more Ctrl-C must not break the exit
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            if _state["debug"]:
                raise
            print_error(exc.lines(), exc.label)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            print_error("interrupted")
            raise typer.Exit(130) from None
        except OSError as exc:  # the OS refused something: its words and the file, not a bug
            if _state["debug"]:
                raise
            from aecli.errors import os_reason

            reason = os_reason(exc)
            print_error(f"{exc.filename}: {reason}" if exc.filename is not None else reason)
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: say so in one line, traceback with --debug
            if _state["debug"]:
                raise
            from aecli.errors import first_line

            if _out_of_memory(exc):
                print_error(
                    f"out of memory: {first_line(exc)} (try a smaller --batch-size, fewer "
                    "images at a time, or a smaller model)"
                )
                raise typer.Exit(1) from None
            print_error(
                f"internal error: {type(exc).__name__}: {first_line(exc)} "
                "(run with --debug for the traceback, and please report it)"
            )
            raise typer.Exit(1) from None

    if command.__doc__:  # paragraphs reflow to the terminal's width in --help
        paragraphs = inspect.cleandoc(command.__doc__).split("\n\n")
        wrapper.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return wrapper


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's failed allocation on the CPU or a GPU."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


__all__ = ["app", "console", "guarded"]

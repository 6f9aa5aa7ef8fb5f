"""The Typer application, global options, and the one place errors become exit codes."""

from __future__ import annotations

import functools
import inspect
import os
import re
import signal
import threading
from collections.abc import Callable
from typing import Annotated, Any

import typer

import aecli
from aecli.cli.render import console, print_error

app = typer.Typer(
    name="aecli",
    help="Train convolutional image autoencoders and VAEs, and put them to work.\n\n"
    "Start with `aecli train`: it trains a small model on built-in data in a minute or two, no "
    "download needed. Documentation: docs/ in the repository (also as a site: mkdocs serve).",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def epilog(examples: str) -> str:
    """A command's examples (a heading, then one command a line) as --help prints them: one
    command a line, never rewrapped (Click's \\b marker), so that each can be copied as it is."""
    lines = [line for line in examples.strip().splitlines() if line.strip()]
    heading = lines[0].replace("[bold]", "").replace("[/bold]", "").rstrip(":") + ":"
    return heading + "\n\n\b\n" + "\n".join(lines[1:])


# interrupted: a command has said that Ctrl-C stopped it (a second Ctrl-C as it returns must
# not say it again, nor print a traceback)
_state = {"debug": os.environ.get("AECLI_DEBUG", "") not in ("", "0"), "interrupted": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aecli {aecli.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Global options."""
    _state["debug"] = debug  # set on every call: one process may run several commands


def interrupted() -> bool:
    """Whether a command of this process has said that Ctrl-C stopped it."""
    return _state["interrupted"]


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command, turning aecli errors into one line on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from aecli.errors import AecliError, Interrupted

        main_thread = threading.current_thread() is threading.main_thread()
        sigint = signal.getsignal(signal.SIGINT) if main_thread else None
        try:
            precheck(kwargs)
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except AecliError as exc:
            if isinstance(
                exc, Interrupted
            ):  # the run is saved; more Ctrl-C must not break the exit
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                _state["interrupted"] = True
            if _state["debug"]:
                raise
            print_error(exc.lines(), exc.label)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            print_error("interrupted")
            _state["interrupted"] = True
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
        finally:  # a command that ignored Ctrl-C while it saved leaves it as it found it
            if main_thread and sigint is not None:
                signal.signal(signal.SIGINT, sigint)

    if command.__doc__:  # paragraphs reflow to the terminal's width in --help
        paragraphs = inspect.cleandoc(command.__doc__).split("\n\n")
        wrapper.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return wrapper


# Paths the commands read, by parameter name: checked before a command imports torch
READ_PATHS = {"weights": None, "data": "--data", "val_data": "--val-data", "resume": "--resume",
              "init": "--init", "vs": "--vs"}  # fmt: skip
DEVICE_NAME = re.compile(r"[a-z_]+(:\d+)?")


def precheck(kwargs: dict[str, Any]) -> None:
    """What can be checked without torch, before a command imports it (seconds on a small
    machine): the files and folders it reads exist, and --device is spelt like a device.
    Whether the device exists, and everything else, the command itself checks."""
    from aecli.errors import UsageError, WeightsError, missing_data

    for name, option in READ_PATHS.items():
        value = kwargs.get(name)
        if not isinstance(value, str | os.PathLike):  # a flag of the same name (encode --resume)
            continue
        text = os.fspath(value)
        if not text or text == "-" or "{" in text or os.path.lexists(text):
            continue
        if option is None:
            raise WeightsError("file not found", path=text)
        if option in ("--data", "--val-data"):  # as load_data says it, with what it takes
            raise missing_data(text, option)
        raise UsageError(f"{option} {text}: not found")
    device = kwargs.get("device")
    if isinstance(device, str) and not DEVICE_NAME.fullmatch(device.strip()):
        raise UsageError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)")


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's failed allocation on the CPU or a GPU."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


__all__ = ["app", "console", "epilog", "guarded"]

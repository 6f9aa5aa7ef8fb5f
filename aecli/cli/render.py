"""Human output on stderr (rich), results on stdout: JSON, and the listings of `presets` and
`info`. Off a terminal (logs, pipes) nothing is wrapped at rich's default 80 columns."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aecli.errors import printable

# Wide enough that no line of a log or a pipe is wrapped; a terminal's own width otherwise.
UNWRAPPED = 100_000


def _console(stream, **options) -> Console:
    return Console(highlight=False, width=None if stream.isatty() else UNWRAPPED, **options)


console = _console(sys.stderr, stderr=True)  # progress, summaries, warnings and errors
results = _console(sys.stdout)  # what a listing command was asked for


def shown(value: Any) -> str:
    """A user's string (a path, a name) inside a rich message: control characters and rich
    markup (`[red]`, `[/b]`) shown as they are."""
    return escape(printable(str(value)))


def print_error(message: str | list[str], label: str = "error") -> None:
    """One line per message (a list: several, as a preset's problems), each printable."""
    colour = "yellow" if label == "interrupted" else "red"
    for line in [message] if isinstance(message, str) else message or [""]:
        console.print(f"[bold {colour}]{label}:[/bold {colour}] {shown(line)}", soft_wrap=True)


def print_warning(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {shown(message)}", soft_wrap=True)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(
        title=shown(title), show_header=False, title_justify="left", box=None, pad_edge=False
    )
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, shown(value))
    return table


def fmt_metric(name: str, value: float) -> str:
    if "psnr" in name:
        return f"{value:.2f} dB"
    if name == "lr":
        return f"{value:.2e}"
    if name == "ssim":
        return f"{value:.4f}"
    return f"{value:.4g}"


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A transient bar on stderr (images done / total, rate, time); yields `advance(n)`."""
    progress = Progress(
        TextColumn(f"[bold]{escape(description)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # no bar (nor its blank line) in logs and pipes
    )
    task = progress.add_task(description, total=total, rate="")
    start = time.perf_counter()
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        rate = done / max(time.perf_counter() - start, 1e-9)
        progress.update(task, advance=n, rate=f"{rate:.0f} img/s")

    with progress:
        yield advance


def print_failures(failures: list, verb: str = "failed") -> None:
    """Every failed input on its own line: `failed: PATH: reason`."""
    for failure in failures:
        console.print(
            f"[bold red]{verb}:[/bold red] {shown(failure.path)}: {shown(failure.reason)}",
            soft_wrap=True,
        )


def failure_rows(failures: list) -> list[dict]:
    """Failed inputs for --json: [{"file": ..., "reason": ...}]."""
    return [{"file": f.path, "reason": f.reason} for f in failures]


def metrics_table(title: str, rows: list[dict], columns: list[str], overall: dict | None = None):
    """Per-image metric rows (file first) and an optional `mean` row."""
    # at least as wide as its title, which rich would otherwise wrap to the table's width
    table = Table(title=shown(title), title_justify="left", min_width=len(title))
    table.add_column("file", min_width=16, overflow="fold")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)

    def cell(key: str, value: Any) -> str:
        if isinstance(value, float):
            return fmt_metric(key.removeprefix("vs_"), value)
        return str(value)

    for row in rows:
        table.add_row(shown(row["file"]), *(cell(c, row[c]) for c in columns))
    if overall:
        table.add_section()
        table.add_row(
            "[bold]mean[/bold]", *(cell(c, overall[c]) if c in overall else "" for c in columns)
        )
    return table

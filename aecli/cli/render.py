"""Human output on stderr (rich) and machine output on stdout (JSON)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True, highlight=False)


def print_error(message: str, label: str = "error") -> None:
    colour = "yellow" if label == "interrupted" else "red"
    for line in message.splitlines() or [""]:
        console.print(f"[bold {colour}]{label}:[/bold {colour}] {escape(line)}", soft_wrap=True)


def print_warning(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    return table


def fmt_metric(name: str, value: float) -> str:
    if "psnr" in name:
        return f"{value:.2f} dB"
    if name == "lr":
        return f"{value:.2e}"
    return f"{value:.4g}"

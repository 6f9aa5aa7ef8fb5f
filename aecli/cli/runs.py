"""`aecli runs` (a table of training runs) and `aecli report` (a run's report.html)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from aecli.cli.options import Json, Overwrite
from aecli.cli.render import console, print_json, results, shown

if TYPE_CHECKING:
    from aecli.run.status import RunSummary

RUNS_EXAMPLES = """
[bold]Examples[/bold]

  aecli runs
  aecli runs experiments/ --json
"""

REPORT_EXAMPLES = """
[bold]Examples[/bold]

  aecli report runs/photos
  aecli report runs/demo -o demo-report.html
"""

STATE_STYLE = {
    "running": "bold blue",
    "finished": "green",
    "stopped": "green",
    "interrupted": "yellow",
    "failed": "red",
}


def runs(
    folder: Annotated[
        Path,
        typer.Argument(
            metavar="FOLDER",
            help="A folder of run directories (searched at any depth), or one run directory.",
        ),
    ] = Path("runs"),
    as_json: Json = False,
) -> None:
    """List training runs, newest first, with their state and best figures.

    Each row: the run with its preset and data, epochs done of planned, the best validation
    PSNR and loss, and the state: running, finished, stopped (early stopping), interrupted (a
    checkpoint to resume from) or failed. Under the table, one line per run with something to
    say: why it failed, what in its folder is damaged, the command that continues it."""
    from aecli.errors import UsageError
    from aecli.run.status import find_runs

    if not folder.is_dir():
        raise UsageError(
            "no such folder (train with --out DIR, or give the runs' folder)", path=folder
        )
    found = find_runs(folder)
    if as_json:
        print_json([r.as_dict() for r in found])
        return
    if not found:
        console.print(f"no training runs in {shown(folder)}")
        return
    title = f"Training runs in {folder}"
    table = Table(title=shown(title), title_justify="left", min_width=len(title))
    # at 80 columns the figures keep their width and the run's cell (its name, then its preset
    # and data, dim) wraps; a state's reason and the resume command go under the table
    table.add_column("run", overflow="fold", min_width=12)
    for column in ("epochs", "best PSNR", "best loss", "state"):
        table.add_column(column, justify="left" if column == "state" else "right", no_wrap=True)
    for r in found:
        planned = f"/{r.epochs_planned}" if r.epochs_planned else ""
        table.add_row(
            f"{shown(_relative(r.path, folder))}\n[dim]{shown(r.preset)} on {shown(r.data)}[/]",
            f"{r.epochs_done}{planned}",
            "-" if r.best_val_psnr is None else f"{r.best_val_psnr:.2f} dB",
            "-" if r.best_val_loss is None else f"{r.best_val_loss:.4g}",
            f"[{STATE_STYLE[r.state]}]{r.state}[/]",
        )
    results.print(table)
    for r in found:
        if note := run_note(r):
            console.print(f"{shown(_relative(r.path, folder))}: {shown(note)}", soft_wrap=True)


def run_note(run: RunSummary) -> str:
    """What a run's line under the table says: its state's reason (what failed, what is
    damaged) and the command that continues it; empty where there is nothing to say."""
    parts = [run.reason] if run.reason else []
    if run.resume and run.resume not in run.reason:  # an interrupt's reason names it already
        parts.append(f"continue with {run.resume}")
    return "; ".join(parts)


def _relative(path: str, folder: Path) -> str:
    try:
        return str(Path(path).relative_to(folder)) or "."
    except ValueError:
        return path


def report(
    run: Annotated[
        Path,
        typer.Argument(
            metavar="RUN", help="A run directory (what aecli train wrote).", show_default=False
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="Write the report here instead of RUN/report.html.",
            show_default=False,
        ),
    ] = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Write a run's report: curves, grids and facts on one self-contained HTML page.

    The page needs no network, scripts or fonts from elsewhere: loss curves, every epoch's
    validation grid, the configuration, device, model facts, final and best metrics, and the
    samples and interpolation drawn at the end of training. Training rewrites RUN/report.html
    after every epoch; this writes it again on demand (a run killed before its last one, a
    report deleted)."""
    from aecli.errors import UsageError
    from aecli.io.outputs import OutputGuard
    from aecli.run.files import RunDirectory
    from aecli.run.report import write_report
    from aecli.run.status import RUN_FILES, is_run, training_process

    if not is_run(run):
        raise UsageError(
            f"not a run directory (it holds fewer than two of {', '.join(RUN_FILES)})",
            path=run,
        )
    if out is not None:
        OutputGuard([run]).check("-o", [out], overwrite=overwrite)
    else:
        holder = training_process(RunDirectory(run))
        if holder is not None:  # report.html is the training process's to write
            raise UsageError(
                f"aecli train (process {holder}) is training in this folder and rewrites "
                "report.html after every epoch; open that, or write a copy with -o FILE",
                path=run,
            )
    start = time.perf_counter()
    written = write_report(RunDirectory(run), out)
    size = written.stat().st_size
    console.print(
        f"report of {shown(run)} -> {shown(written)} ({size / 2**20:.1f} MB) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if as_json:
        print_json({"run": str(run), "report": str(written), "bytes": size})

"""Run folders as users and accidents leave them (issue 45): the report a run writes as it ends,
`aecli runs` at 80 columns, FIFOs in place of a run's files, a metrics.jsonl of gigabytes."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
from conftest import one_line, within
from rich.console import Console
from test_engine import StopAt

from aecli.config import load_config
from aecli.data import load_data
from aecli.errors import Interrupted, TrainingError
from aecli.run.files import run_lock
from aecli.run.training import trainer_in


def trainer(tiny_preset: Path, run: Path, *overrides: str, reporter: StopAt | None = None):
    """A Trainer of the tiny preset for 2 epochs; `reporter` may press Ctrl-C at a step."""
    config = load_config(str(tiny_preset), ["train.epochs=2", *overrides]).config
    data = load_data(None, config.data, config.train.seed)
    reporter = reporter or StopAt(step=-1)
    made = trainer_in(config, data, run, preset="tiny", reporter=reporter, device="cpu")
    reporter.trainer = made
    return made


def locked(run: Path):
    """The run folder's lock, as `aecli train --out` holds it for the run's life."""
    run.mkdir(parents=True, exist_ok=True)
    return run_lock(run, "--out")


def report_state(run: Path) -> str:
    page = (run / "report.html").read_text()
    return re.search(r"<th>state</th><td>([^<]*)</td>", page)[1]


def test_the_report_a_run_writes_as_it_ends_states_how_it_ended(tiny_preset, tmp_path, cli):
    """As `aecli train` runs it, holding the run's lock: a finished run's own report says
    finished, an interrupted one's says interrupted with the command that continues it, a run
    stopped by a NaN says failed; the report written after an epoch still says running."""
    finished = tmp_path / "finished"
    assert cli("train", tiny_preset, "--out", finished, "--epochs", 1).exit_code == 0
    assert report_state(finished) == "finished"

    cut = tmp_path / "cut"
    with locked(cut), pytest.raises(Interrupted):
        trainer(tiny_preset, cut, "train.log_every=1", reporter=StopAt(step=4)).fit()
    assert report_state(cut).startswith("interrupted")
    page = (cut / "report.html").read_text()
    assert f"Continue this run with <code>aecli train --resume {cut}</code>" in page

    nan = tmp_path / "nan"
    with locked(nan), pytest.raises(TrainingError, match="non-finite"):
        trainer(tiny_preset, nan, "optim.lr=1e12", "train.log_every=1").fit()
    assert report_state(nan).startswith("failed: ") and "non-finite" in report_state(nan)

    class StateAfterEpoch(StopAt):
        def epoch(self, record):
            self.seen = report_state(self.trainer.run_dir)

    running = tmp_path / "running"
    made = trainer(tiny_preset, running, "train.epochs=1", reporter=StateAfterEpoch(step=-1))
    with locked(running):
        made.fit()
    assert made.reporter.seen == "running" and report_state(running) == "finished"


def test_runs_is_readable_at_80_columns_with_the_resume_command_under_it(
    tiny_preset, tmp_path, cli, monkeypatch
):
    runs = tmp_path / "runs"
    names = ("cifar-res-20250312-104512", "cifar-res-20250312-111845")
    assert cli("train", tiny_preset, "--out", runs / names[0], "--epochs", 1).exit_code == 0
    cut = runs / names[1]
    with pytest.raises(Interrupted):
        trainer(tiny_preset, cut, "train.log_every=1", reporter=StopAt(step=4)).fit()
    screen = io.StringIO()
    monkeypatch.setattr("aecli.cli.runs.results", Console(file=screen, width=80))
    result = cli("runs", runs)
    assert result.exit_code == 0, result.output
    table = screen.getvalue()
    assert max(len(line) for line in table.splitlines()) <= 80
    cells = [line.split("│")[1].strip() for line in table.splitlines() if "│" in line]
    for name in names:
        assert name in cells  # whole, on one line
    assert " ".join(cells).count("tiny on built-in shapes (96 images)") == 2
    header = next(line for line in table.splitlines() if "run" in line and "state" in line)
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == [
        "run", "epochs", "best PSNR", "best loss", "state"
    ]  # fmt: skip
    assert "interrupted" in table and "finished" in table
    assert "--resume" not in table
    notes = result.stderr.splitlines()
    (note,) = [line for line in notes if line.startswith(f"{names[1]}: ")]
    assert f"aecli train --resume {cut}" in note
    assert not any(line.startswith(f"{names[0]}: ") for line in notes)  # nothing to say


@pytest.mark.parametrize("name", ["state.json", "metrics.jsonl"])
def test_resume_refuses_a_fifo_for_a_run_file_in_one_line(tiny_preset, tmp_path, cli, name):
    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run, "--epochs", 1).exit_code == 0
    (run / name).unlink()
    os.mkfifo(run / name)
    with within(60):
        result = cli("train", "--resume", run, "--epochs", 2)
    assert result.exit_code == 2
    assert f"{run / name}: not a regular file (a FIFO)" in one_line(result)
    assert (run / "state.json").exists() and not (run / "grids" / "epoch-0002.png").exists()


def test_runs_and_report_never_block_on_a_fifo_in_a_run_folder(tiny_preset, tmp_path, cli):
    """Every file of one run a FIFO: `runs` lists it, saying which, beside the good run, and
    offers no resume that would be refused; `report` writes its page, or refuses in one line
    where report.html itself is the FIFO."""
    runs = tmp_path / "runs"
    assert cli("train", tiny_preset, "--out", runs / "good", "--epochs", 1).exit_code == 0
    shutil.copytree(runs / "good", runs / "pipes")
    fifos = ["state.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors"]
    for name in fifos:
        (runs / "pipes" / name).unlink()
        os.mkfifo(runs / "pipes" / name)
    with within(60):
        listing = cli("runs", runs, "--json")
        table = cli("runs", runs)
        report = cli("report", runs / "pipes")
    assert listing.exit_code == 0 and table.exit_code == 0, listing.output + table.output
    listed = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(listing.stdout)}
    assert set(listed) == {"good", "pipes"}
    assert listed["good"]["reason"] == "" and listed["good"]["epochs_done"] == 1
    for name in fifos:
        assert f"{name} not a regular file (a FIFO)" in listed["pipes"]["reason"]
    assert listed["pipes"]["resume"] is None
    assert "pipes: metrics.jsonl not a regular file (a FIFO); state.json" in table.stderr
    assert report.exit_code == 0, report.output
    assert (
        "metrics.jsonl not a regular file (a FIFO)" in (runs / "pipes" / "report.html").read_text()
    )
    (runs / "pipes" / "report.html").unlink()
    os.mkfifo(runs / "pipes" / "report.html")
    with within(60):
        result = cli("report", runs / "pipes")
    assert result.exit_code == 2
    assert "report.html: not a regular file (a FIFO)" in one_line(result)


def test_a_metrics_file_of_gigabytes_costs_no_memory_and_hides_no_run(tiny_preset, tmp_path, cli):
    """metrics.jsonl grown to 512 MiB of NUL bytes with no newline (a sparse file: no disk
    used): `runs` lists it as damaged beside the good run, `report` says what is damaged,
    `--resume` continues; none of them reads it whole, none advises --batch-size."""
    runs = tmp_path / "runs"
    for name in ("good", "huge"):
        assert cli("train", tiny_preset, "--out", runs / name, "--epochs", 1).exit_code == 0
    metrics = runs / "huge" / "metrics.jsonl"
    records = metrics.read_bytes()
    os.truncate(metrics, 512 << 20)
    tracemalloc.start()
    try:
        listing = cli("runs", runs, "--json")
        table = cli("runs", runs)
        report = cli("report", runs / "huge")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"
    assert listing.exit_code == 0 and table.exit_code == 0 and report.exit_code == 0
    listed = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(listing.stdout)}
    assert set(listed) == {"good", "huge"} and listed["huge"]["epochs_done"] == 1
    damage = f"metrics.jsonl not read past byte {len(records):,} (a line longer than 65,536 bytes)"
    assert damage in listed["huge"]["reason"]
    assert f"huge: {damage}" in table.stderr
    assert damage in (runs / "huge" / "report.html").read_text()
    for result in (listing, table, report):
        assert "--batch-size" not in result.output

    tracemalloc.start()
    try:
        resumed = cli("train", "--resume", runs / "huge", "--epochs", 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resumed.exit_code == 0, resumed.output
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"
    kept = metrics.read_bytes()  # the first epoch's records, then the second's; no NUL byte
    assert kept.startswith(records) and b"\0" not in kept and kept.count(b'"kind": "epoch"') == 2


def test_a_metrics_file_of_damaged_lines_is_read_only_so_far(tmp_path):
    """Thousands of damaged lines (a file that is not a record of training): the reading stops
    after METRICS_DAMAGE_LIMIT of them, saying so, with the records before kept."""
    from aecli.run.files import METRICS_DAMAGE_LIMIT, RunDirectory

    run = RunDirectory(tmp_path)
    record = json.dumps({"kind": "epoch", "epoch": 1, "step": 3, "loss": 0.5}) + "\n"
    run.metrics.write_text(record + "not a record\n" * 100_000 + record)
    assert run.records() == [json.loads(record)]
    assert run.damage.startswith(f"{METRICS_DAMAGE_LIMIT} damaged lines in metrics.jsonl skipped")
    assert f"({METRICS_DAMAGE_LIMIT:,} damaged lines)" in run.damage

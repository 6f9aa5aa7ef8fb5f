"""report.html, state.json, `aecli runs` and TensorBoard logging (issue 16)."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import epochs_of
from PIL import Image
from test_engine import StopAt, start_long_run

from aecli.config import load_config
from aecli.data import load_data
from aecli.errors import Interrupted, TrainingError
from aecli.io.images import png_bytes
from aecli.run.files import RunDirectory
from aecli.run.report import GRID_BUDGET, write_report
from aecli.run.status import find_runs
from aecli.run.training import train, trainer_in

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs chromium (apt install chromium)"
)

# Appended to a copy of the report: once the page and its images have loaded, reads the
# rendered DOM, steps the grid control back once and writes what it saw into the page.
CHECK = """
<script>
window.addEventListener("load", function () {
  const seen = {charts: {}, images: [], steps: []};
  for (const svg of document.querySelectorAll("svg.chart")) {
    const series = {};
    for (const g of svg.querySelectorAll("g.series")) {
      series[g.dataset.series] = g.querySelectorAll("circle").length;
    }
    seen.charts[svg.dataset.chart] = series;
  }
  for (const img of document.querySelectorAll("img")) {  // a broken image has no natural size
    seen.images.push({alt: img.alt, ok: img.complete && img.naturalWidth > 0});
  }
  const visible = () => [...document.querySelectorAll(".grid-image")]
    .filter((i) => !i.hidden).map((i) => Number(i.dataset.epoch));
  seen.steps.push(visible());
  document.getElementById("grid-prev").click();
  seen.steps.push(visible());
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script>
"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def tiny_run(tiny_preset, path, overrides=(), **options):
    config = load_config(str(tiny_preset), ["train.epochs=3", *overrides]).config
    data = load_data(None, config.data, config.train.seed)
    return train(config, data, path, preset="tiny", device="cpu", **options)


@needs_chromium
def test_report_renders_in_chromium_with_a_point_per_epoch(tiny_preset, tmp_path):
    run = tmp_path / "run"
    tiny_run(tiny_preset, run, ["train.log_every=1"])
    report = run / "report.html"
    page = report.read_text()
    assert "http://" not in page and "https://" not in page  # nothing from the network
    assert "<script src" not in page and "@import" not in page and "url(" not in page
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    shown = chromium(
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        checked.as_uri(),
    )
    console = [line for line in shown.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no errors, no warnings, nothing logged
    dom = shown.stdout
    assert '<pre id="check">' in dom, (len(dom), dom[-300:], shown.stderr[-3000:])
    start = dom.index('<pre id="check">') + len('<pre id="check">')
    seen = json.loads(html.unescape(dom[start : dom.index("</pre>", start)]))
    charts = seen["charts"]
    assert {"loss", "val_psnr", "lr", "images_per_s"} <= set(charts)
    assert charts["loss"]["training (epoch)"] == 3 and charts["loss"]["validation"] == 3
    assert charts["loss"]["training (window)"] == 0  # a line, no markers
    assert charts["val_psnr"] == {"validation": 3}
    assert charts["lr"]["epoch"] == 3 and charts["images_per_s"]["epoch"] == 3
    # three grids, the samples and the interpolation strip, each decoded by the browser
    assert len(seen["images"]) == 5
    assert all(image["ok"] for image in seen["images"]), seen["images"]
    assert seen["steps"] == [[3], [2]]  # the last epoch's grid first; back one step
    screenshot = tmp_path / "report.png"
    chromium("--screenshot=" + str(screenshot), "--window-size=1280,2000", report.as_uri())
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 10  # drawn, not blank


def test_report_of_a_thousand_epochs_stays_under_20_mb(tiny_preset, tmp_path):
    """Every epoch keeps its point; grids past the budget are thinned, first and last kept."""
    run = RunDirectory(tmp_path / "long")
    tiny_run(tiny_preset, run.path, ["train.epochs=1"])
    rng = np.random.default_rng(0)
    records, grid = [], None
    for epoch in range(1, 1001):
        for w in range(1, 11):
            step = (epoch - 1) * 10 + w
            records.append({"kind": "window", "epoch": epoch, "step": step, "loss": 1 / step})
        records.append(
            {"kind": "epoch", "epoch": epoch, "step": epoch * 10, "loss": 1 / epoch}
            | {"lr": 1e-3, "images_per_s": 100.0, "val_loss": 1 / epoch, "val_psnr": 20.0}
        )
        if epoch % 100 == 1:  # incompressible, ~48 KB each: 1,000 of them are 48 MB
            grid = png_bytes(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
        (run.grids / f"epoch-{epoch:04d}.png").write_bytes(grid)
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    page = write_report(run).read_text()
    assert run.report.stat().st_size < 20 * 2**20
    assert 1000 * len(grid) > GRID_BUDGET  # so the budget was needed
    epochs = [int(part.split('"')[0]) for part in page.split('data-epoch="')[1:]]
    assert epochs[0] == 1 and epochs[-1] == 1000 and len(epochs) < 1000
    assert f"{len(epochs)} of 1000 epochs shown" in page
    loss_chart = page[page.index('data-chart="loss"') :]
    loss_chart = loss_chart[: loss_chart.index("</svg>")]
    validation = loss_chart[loss_chart.index('data-series="validation"') :]
    assert validation[: validation.index("</g>")].count("<circle") == 1000


def test_state_follows_the_run_and_runs_lists_each_kind(tiny_preset, tmp_path, cli):
    runs = tmp_path / "runs"
    tiny_run(tiny_preset, runs / "finished")
    config = load_config(str(tiny_preset), ["train.epochs=3", "train.log_every=1"]).config
    data = load_data(None, config.data, config.train.seed)
    reporter = StopAt(step=4)
    trainer = trainer_in(config, data, runs / "cut", preset="tiny", reporter=reporter, device="cpu")
    reporter.trainer = trainer
    with pytest.raises(Interrupted):
        trainer.fit()
    with pytest.raises(TrainingError, match="non-finite"):
        tiny_run(tiny_preset, runs / "nan", ["optim.lr=1e12", "train.log_every=1"])

    states = {r.path.split("/")[-1]: r for r in find_runs(runs)}
    assert {name: r.state for name, r in states.items()} == {
        "finished": "finished",
        "cut": "interrupted",
        "nan": "failed",
    }
    assert states["finished"].epochs_done == 3 and states["finished"].epochs_planned == 3
    assert states["finished"].best_val_psnr == max(
        r["val_psnr"] for r in epochs_of(runs / "finished")
    )
    assert states["cut"].resume == f"aecli train --resume {runs / 'cut'}"
    assert "non-finite" in states["nan"].reason and states["nan"].resume is None
    assert f"aecli train --resume {runs / 'cut'}" in (runs / "cut" / "report.html").read_text()

    listing = json.loads(cli("runs", runs, "--json").stdout)
    assert [r["path"].split("/")[-1] for r in listing] == ["nan", "cut", "finished"]  # newest first
    table = cli("runs", runs)
    assert table.exit_code == 0
    for word in ("finished", "interrupted", "failed", "tiny", "3/3"):
        assert word in table.stdout
    assert "aecli train --resume" in table.stderr

    # a run killed without a word (its process gone) is interrupted where its checkpoint is
    # mid-run, and finished where the checkpoint says everything was written
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    for name in ("cut", "finished"):
        state = json.loads((runs / name / "state.json").read_text())
        state.update(state="running", pid=int(gone.stdout))
        (runs / name / "state.json").write_text(json.dumps(state))
    states = {r.path.split("/")[-1]: r for r in find_runs(runs)}
    assert states["cut"].state == "interrupted" and "killed" in states["cut"].reason
    assert states["finished"].state == "finished" and states["finished"].reason == ""


def test_report_command_writes_elsewhere_and_refuses_a_non_run(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    tiny_run(tiny_preset, run, ["train.epochs=1"])
    out = tmp_path / "copy.html"
    result = cli("report", run, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes"] == out.stat().st_size
    assert "validation grid, epoch 1" in out.read_text()
    result = cli("report", tmp_path)
    assert result.exit_code == 2 and "not a run directory" in result.stderr
    result = cli("runs", tmp_path / "missing")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1  # one line naming the folder, no traceback
    assert result.stderr.startswith(f"error: {tmp_path / 'missing'}: no such folder")


def test_tensorboard_events_hold_every_metric_and_the_grids(tiny_preset, tmp_path, cli):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = cli("train", tiny_preset, "--out", run, "--log-to", "tensorboard", "--device", "cpu")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    records = epochs_of(run)
    for key, value in records[-1].items():
        if key in ("kind", "epoch", "step"):
            continue
        scalars = events.Scalars(f"epoch/{key}")
        assert [s.step for s in scalars] == [r["step"] for r in records], key
        assert scalars[-1].value == pytest.approx(value, rel=1e-6), key
    assert len(events.Scalars("window/loss")) == len(RunDirectory(run).windows())
    assert len(events.Images("validation")) == len(records)
    assert {"samples", "interpolation"} <= set(events.Tags()["images"])


def test_log_to_tensorboard_without_the_package_is_one_line(
    tiny_preset, tmp_path, cli, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    result = cli("train", tiny_preset, "--out", tmp_path / "run", "--log-to", "tensorboard")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "pip install" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_run_without_its_state_and_report_lists_and_reports(tiny_preset, tmp_path, cli):
    """state.json, the report and the final pictures deleted, and no window records: the run is
    listed from its other files, and `report` writes its page again."""
    run = tmp_path / "old"
    tiny_run(tiny_preset, run, ["train.epochs=2"])
    epochs = epochs_of(run)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    for name in ("state.json", "report.html", "samples.png", "interpolation.png"):
        (run / name).unlink()
    (listed,) = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert (listed["state"], listed["preset"], listed["epochs_done"]) == ("finished", "tiny", 2)
    assert listed["data"] == "built-in shapes (96 images)"
    assert cli("report", run).exit_code == 0
    page = (run / "report.html").read_text()
    assert page.count('class="grid-image"') == 2 and 'data-chart="val_psnr"' in page


def test_files_aecli_did_not_write_in_grids_are_ignored(tiny_preset, tmp_path, cli):
    """A stray copy in grids/ (epoch-final.png), a folder and a FIFO named like grids: the report
    and a resumed run go on without them."""
    import os

    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run, "--epochs", 1).exit_code == 0
    grid = run / "grids" / "epoch-0001.png"
    (run / "grids" / "epoch-final.png").write_bytes(grid.read_bytes())
    (run / "grids" / "epoch-0007.png").mkdir()
    os.mkfifo(run / "grids" / "epoch-0008.png")
    result = cli("train", "--resume", run, "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert cli("report", run).exit_code == 0
    html = (run / "report.html").read_text()
    assert 'data-epoch="1"' in html and 'data-epoch="2"' in html
    assert html.count('class="grid-image"') == 2  # epochs 1 and 2, nothing else


def test_damaged_metrics_and_state_leave_every_run_listed(tiny_preset, tmp_path, cli):
    """Bad bytes, JSON that is not a record, and state.json values of the wrong type: the run is
    listed with what can be read (the damaged lines counted), the others too, and its report and
    --resume work."""
    import json

    runs = tmp_path / "runs"
    for name in ("good", "bad"):
        assert cli("train", tiny_preset, "--out", runs / name, "--epochs", 2).exit_code == 0
    metrics = runs / "bad" / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines()
    damaged = [b"\xff\xfe not utf-8", b"[1, 2]", b"null", b'{"kind": "epoch", "epoch": "x"}']
    metrics.write_bytes(b"\n".join(lines[:2] + damaged + lines[2:]) + b"\n")
    state = json.loads((runs / "bad" / "state.json").read_text())
    state.update(epochs="many", started="yesterday", data=[1], reason=7)
    (runs / "bad" / "state.json").write_text(json.dumps(state))
    result = cli("runs", runs, "--json")
    assert result.exit_code == 0, result.output
    listed = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(result.stdout)}
    assert set(listed) == {"good", "bad"}
    assert "4 damaged lines in metrics.jsonl skipped" in listed["bad"]["reason"]
    assert listed["bad"]["epochs_done"] == 2
    assert cli("report", runs / "bad").exit_code == 0
    assert cli("train", "--resume", runs / "bad", "--epochs", 3).exit_code == 0


LOCK_HOLDER = """\
import sys
import time
from pathlib import Path
from aecli.run.files import run_lock
lock = run_lock(Path(sys.argv[1]), "--out")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_run_another_process_trains_is_running_and_left_alone(tiny_preset, tmp_path, cli):
    """A process holding a finished run's lock (a resume in progress, whatever state.json says):
    `runs` lists it as running with that process, `report` leaves its report.html alone (a copy
    with -o is fine), and a second train or resume is refused; not one of its files changes."""
    from conftest import one_line

    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run, "--epochs", 1).exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        (listed,) = json.loads(cli("runs", tmp_path, "--json").stdout)
        assert listed["state"] == "running"
        result = cli("report", run)
        assert result.exit_code == 2
        assert f"aecli train (process {holder.pid}) is training in this folder" in one_line(result)
        assert cli("report", run, "-o", tmp_path / "copy.html").exit_code == 0
        for args in (
            ["train", "--resume", run, "--epochs", 2],
            ["train", tiny_preset, "--out", run],
        ):
            result = cli(*args)
            assert result.exit_code == 2 and f"(process {holder.pid})" in one_line(result)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        holder.communicate("")
    (listed,) = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert listed["state"] == "finished"


def test_the_report_written_while_training_keeps_the_run_lock(tiny_preset, tmp_path, cli):
    """Asking who holds a lock must not let go of this process's own (closing any descriptor of
    a POSIX-locked file does): after an epoch's report, the folder is still locked."""
    from aecli.io.locks import lock_holder
    from aecli.run.files import RUN_LOCK

    run = tmp_path / "run"
    training = start_long_run(tiny_preset, run)
    try:
        for _ in range(1200):  # two reports written, each after a look at the run's state
            if epochs_of(run)[1:]:
                break
            time.sleep(0.05)
        assert lock_holder(run / RUN_LOCK) == training.pid
        result = cli("train", "--resume", run)
        assert result.exit_code == 2 and "another aecli train is running" in result.stderr
    finally:
        training.kill()
        training.wait()


def test_a_run_lock_that_is_a_link_is_refused_and_its_target_kept(tiny_preset, tmp_path, cli):
    """A symbolic link (or a folder) where the lock file goes: train refuses it in one line and
    the file the link points at is not truncated."""
    from conftest import one_line

    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run, "--epochs", 1).exit_code == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's notes\n")
    lock = run / ".aecli-run.lock"
    lock.unlink()
    lock.symlink_to(notes)
    for args in (["train", "--resume", run, "--epochs", 2], ["train", tiny_preset, "--out", run]):
        result = cli(*args)
        assert result.exit_code == 2 and "not a lock file aecli wrote" in one_line(result)
    assert notes.read_text() == "a user's notes\n"
    (listed,) = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert listed["state"] == "finished"


def test_damaged_run_files_are_listed_and_reported(tiny_preset, tmp_path, cli):
    """state.json nested 100,000 deep, config.yaml with bad bytes or missing, samples.png a
    folder: `runs` lists every run (saying what is missing or damaged), `report` works."""
    runs = tmp_path / "runs"
    for name in ("deep", "bytes", "no-config"):
        assert cli("train", tiny_preset, "--out", runs / name, "--epochs", 1).exit_code == 0
    (runs / "deep" / "state.json").write_text("[" * 100_000)
    config = runs / "bytes" / "config.yaml"
    config.write_bytes(config.read_bytes()[:40] + b"\x80\xff" + config.read_bytes()[42:])
    (runs / "no-config" / "config.yaml").unlink()
    (runs / "bytes" / "samples.png").unlink()
    (runs / "bytes" / "samples.png").mkdir()
    result = cli("runs", runs, "--json")
    assert result.exit_code == 0, result.output
    listed = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(result.stdout)}
    assert set(listed) == {"deep", "bytes", "no-config"}
    assert "config.yaml missing" in listed["no-config"]["reason"]
    assert "config.yaml damaged" in listed["bytes"]["reason"]
    assert cli("runs", runs).exit_code == 0
    for name in listed:
        result = cli("report", runs / name)
        assert result.exit_code == 0, result.output
        assert "validation grid, epoch 1" in (runs / name / "report.html").read_text()


def test_train_out_keeps_the_metrics_of_a_run_without_checkpoint(tiny_preset, tmp_path, cli):
    """A run folder whose checkpoint and weights are gone still holds its record of training:
    a new train --out there is refused instead of starting metrics.jsonl afresh."""
    from conftest import one_line

    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run, "--epochs", 2).exit_code == 0
    for name in ("checkpoint.safetensors", "model.safetensors"):
        (run / name).unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    result = cli("train", tiny_preset, "--out", run, "--epochs", 1)
    assert result.exit_code == 2
    assert "metrics.jsonl (2 epochs, no checkpoint to resume from)" in one_line(result)
    assert (run / "metrics.jsonl").read_bytes() == metrics

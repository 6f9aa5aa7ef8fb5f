"""report.html: one self-contained page (inline SVG curves, embedded PNGs, no network, no
external scripts or fonts) that the trainer rewrites after every epoch and `aecli report RUN`
on demand.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from aecli.io.atomic import atomic_write_text
from aecli.run.files import RunDirectory, RunState, is_epoch
from aecli.run.status import RunSummary, config_text, finite, summarize_run

# PNG bytes of grids embedded in one report at most (16 MiB once base64-encoded), so that a run
# of 1,000 epochs of large grids still gives a page under 20 MB; past this, the grids of evenly
# spaced epochs (always the first and the last) are shown.
GRID_BUDGET = 12 * 2**20
# Points of a window curve drawn at most (evenly spaced windows past this).
MAX_WINDOW_POINTS = 2000
# Fields of metrics.jsonl records that are not loss terms.
NOT_TERMS = {"kind", "epoch", "step", "lr", "images_per_s", "seconds", "mfu"}


def write_report(run: RunDirectory, out: Path | None = None) -> Path:
    """Write (atomically) the run's report: RUN/report.html unless `out` is given."""
    target = Path(out) if out is not None else run.writable(run.report)
    atomic_write_text(target, build_report(run))
    return target


def build_report(run: RunDirectory) -> str:
    records = run.records()
    history = [r for r in records if is_epoch(r)]
    windows = [r for r in records if not is_epoch(r)]
    summary = summarize_run(run.path, history, run.damage)
    recorded = run.read_state()
    sections = [
        _overview(run, summary, recorded, history),
        _curves(history, windows),
        _grids(run),
        _previews(run),
        _config_section(run),
    ]
    title = f"aecli run {run.path.name}"
    return PAGE.format(
        title=html.escape(title),
        heading=html.escape(title),
        body="\n".join(s for s in sections if s),
        style=STYLE,
        script=SCRIPT,
    )


def _overview(
    run: RunDirectory, summary: RunSummary, recorded: RunState, history: list[dict]
) -> str:
    rows = [
        ("state", f"{summary.state}" + (f": {summary.reason}" if summary.reason else "")),
        ("preset", summary.preset),
        ("data", summary.data),
        ("device", recorded.device or "?"),
        *([("execution", recorded.execution)] if recorded.execution else []),
        (
            "epochs",
            f"{summary.epochs_done} of {summary.epochs_planned}"
            if summary.epochs_planned
            else str(summary.epochs_done),
        ),
    ]
    rows += _model_rows(run)
    if history:
        last = history[-1]
        rows.append(("final", _metric_text(last)))
        if summary.best_val_psnr is not None:
            best = max(
                (r for r in history if finite(r.get("val_psnr"))), key=lambda r: r["val_psnr"]
            )
            rows.append((f"best (epoch {best['epoch']})", _metric_text(best)))
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    resume = ""
    if summary.resume:
        resume = (
            '<p class="resume">Continue this run with '
            f"<code>{html.escape(summary.resume)}</code></p>"
        )
    return f'<section id="overview"><table class="facts">{body}</table>{resume}</section>'


def _model_rows(run: RunDirectory) -> list[tuple[str, str]]:
    text = config_text(run)
    return [] if text is None else _model_facts(text)


@functools.lru_cache(maxsize=8)  # a training run asks every epoch
def _model_facts(config_text: str) -> list[tuple[str, str]]:
    from aecli.config import config_from_dict, parse_yaml
    from aecli.models import summarize

    try:
        raw = parse_yaml(config_text, "config.yaml")
        summary = summarize(config_from_dict(raw, "config.yaml"))
    except Exception:  # noqa: BLE001  (a config of another aecli version: the facts are left out)
        return []
    kind = "VAE" if summary.variational else "autoencoder"
    return [
        (
            "parameters",
            f"{summary.parameters:,} (encoder {summary.encoder_parameters:,}, "
            f"decoder {summary.decoder_parameters:,})",
        ),
        ("model", f"{kind}, {summary.latent_kind} latent"),
        ("input", "x".join(map(str, summary.input_shape))),
        ("latent", "x".join(map(str, summary.latent_shape))),
        ("compression", f"{summary.compression_ratio:g}x"),
        ("compute", f"{summary.forward_gflops:.4g} GFLOPs per image (forward)"),
    ]


def _metric_text(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if key.startswith("val_") and finite(value):
            parts.append(f"{key} {value:.2f} dB" if key == "val_psnr" else f"{key} {value:.4g}")
    return ", ".join(parts) or "-"


# -- curves ----------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (step, value)
    css: str  # the line's class: train, window, val
    markers: bool  # one marker per point (the epoch series)


def _series(records: list[dict], key: str, name: str, css: str, markers: bool) -> Series:
    points = [(r["step"], r[key]) for r in records if finite(r.get(key))]
    return Series(name, points, css, markers)


def _curves(history: list[dict], windows: list[dict]) -> str:
    if not history and not windows:
        return '<section id="curves"><h2>Curves</h2><p>No epoch has finished yet.</p></section>'
    if len(windows) > MAX_WINDOW_POINTS:
        stride = math.ceil(len(windows) / MAX_WINDOW_POINTS)
        windows = windows[::stride]
    keys = {k for r in history + windows for k in r}
    terms = sorted(k for k in keys if k not in NOT_TERMS and not k.startswith("val_"))
    terms += sorted(
        k[4:] for k in keys if k.startswith("val_") and k != "val_psnr" and k[4:] not in terms
    )
    # the total first; a term that is the whole loss (a single-term objective) is its chart
    terms.sort(key=lambda t: t != "loss")
    terms = [t for t in terms if t == "loss" or not _same_as_loss(history, t)]
    charts = []
    for term in terms:
        series = [
            _series(windows, term, "training (window)", "window", False),
            _series(history, term, "training (epoch)", "train", True),
            _series(history, f"val_{term}", "validation", "val", True),
        ]
        charts.append(_chart(term, term, series))
    charts.append(
        _chart("val_psnr", "PSNR (dB)", [_series(history, "val_psnr", "validation", "val", True)])
    )
    for key, label in (("lr", "learning rate"), ("images_per_s", "images/s"), ("mfu", "MFU")):
        series = [
            _series(windows, key, "window", "window", False),
            _series(history, key, "epoch", "train", True),
        ]
        charts.append(_chart(key, label, series))  # none where no record has the key (mfu)
    return (
        '<section id="curves"><h2>Curves</h2><p class="note">One marker per epoch; thin lines '
        "are the logging windows (<code>train.log_every</code> steps). Hover a marker for its "
        f'value.</p><div class="charts">{"".join(c for c in charts if c)}</div></section>'
    )


def _same_as_loss(history: list[dict], term: str) -> bool:
    return bool(history) and all(
        r.get(term) == r.get("loss") and r.get(f"val_{term}") == r.get("val_loss") for r in history
    )


WIDTH, HEIGHT = 460, 250
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 28, 40


def _chart(name: str, label: str, series: list[Series]) -> str:
    series = [s for s in series if s.points]
    if not series:
        return ""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    log = min(ys) > 0 and max(ys) / min(ys) > 30
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    ty = math.log10 if log else (lambda v: v)
    y_lo, y_hi = ty(min(ys)), ty(max(ys))
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - (abs(y_lo) * 0.05 or 1), y_hi + (abs(y_hi) * 0.05 or 1)
    pad = (y_hi - y_lo) * 0.05
    y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (ty(y) - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [
        f'<svg class="chart" data-chart="{html.escape(name)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(label)}">',
        f'<text class="title" x="{LEFT}" y="16">{html.escape(label)}'
        f"{' (log scale)' if log else ''}</text>",
    ]
    for value, text in _log_ticks(y_lo, y_hi) if log else _ticks(y_lo, y_hi):
        y = py(value)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{text}</text>'
        )
    for value, _ in _ticks(x_lo, x_hi):
        if value != int(value):
            continue
        x = px(value)
        parts.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
            f'<text class="tick" x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">'
            f"{int(value):,}</text>"
        )
    parts.append(
        f'<text class="axis" x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
        "training step</text>"
    )
    for s in series:
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        parts.append(
            f'<g class="series {s.css}" data-series="{html.escape(s.name)}">'
            f'<polyline points="{coords}"/>'
        )
        if s.markers:
            parts.extend(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5"><title>step {x:,}: '
                f"{y:.5g}</title></circle>"
                for x, y in s.points
            )
        parts.append("</g>")
    legend = "".join(f'<span class="key {s.css}">{html.escape(s.name)}</span>' for s in series)
    parts.append("</svg>")
    return f'<figure class="curve">{"".join(parts)}<figcaption>{legend}</figcaption></figure>'


def _ticks(lo: float, hi: float, count: int = 5) -> list[tuple[float, str]]:
    """About `count` round values between lo and hi, each with its label, all labels with as
    many decimals as the step between them needs."""
    raw = (hi - lo) / count
    power = math.floor(math.log10(raw))
    factor = next(m for m in (1, 2, 2.5, 5, 10) if m * 10.0**power >= raw)
    step = factor * 10.0**power
    decimals = max(0, -power) + (factor == 2.5)
    first = math.ceil(lo / step) * step
    values = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    return [(v, _label(v, decimals)) for v in values]


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Powers of ten (and 2 and 5 where there are few) between 10**lo and 10**hi, labelled."""
    ticks = []
    for power in range(math.floor(lo), math.ceil(hi) + 1):
        for factor in (1,) if hi - lo > 3 else (1, 2, 5):
            value = factor * 10.0**power
            if lo <= math.log10(value) <= hi:
                ticks.append((value, _label(value, max(0, -power))))
    return ticks


def _label(value: float, decimals: int) -> str:
    """1,000, 0.25, 12.05; powers beyond those in scientific notation (1e-05, 2e+06)."""
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:,.{decimals}f}"


# -- images ----------------------------------------------------------------------------------


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


GRID_NAME = re.compile(r"^epoch-(\d{4,9})\.png$")  # as RunDirectory.write_grid names them


def epoch_grids(run: RunDirectory) -> list[tuple[int, Path]]:
    """The run's grids as (epoch, file), in epoch order; files aecli did not write (another
    name, a folder, a FIFO, a file larger than all the grids a report embeds) are left out."""
    if not run.grids.is_dir():
        return []
    found = []
    for path in run.grids.iterdir():
        match = GRID_NAME.match(path.name)
        if match and path.is_file() and path.stat().st_size <= GRID_BUDGET:
            found.append((int(match[1]), path))
    return sorted(found)


def _grids(run: RunDirectory) -> str:
    found = epoch_grids(run)
    if not found:
        return ""
    grids = [path for _, path in found]
    epochs = dict((path, epoch) for epoch, path in found)
    shown = _within_budget(grids, [p.stat().st_size for p in grids])
    images = "".join(
        f'<img class="grid-image" data-epoch="{epochs[p]}" '
        f'alt="validation grid, epoch {epochs[p]}" src="{_data_uri(p)}"'
        f"{'' if i == len(shown) - 1 else ' hidden'}>"
        for i, p in enumerate(shown)
    )
    note = "" if len(shown) == len(grids) else f" ({len(shown)} of {len(grids)} epochs shown)"
    return (
        '<section id="grids"><h2>Validation images</h2><p class="note">Fixed validation '
        f"images (top) over their reconstructions (bottom){note}.</p>"
        '<div class="stepper"><button type="button" id="grid-prev" aria-label="previous epoch">'
        '&larr;</button><input type="range" id="grid-slider" min="0" '
        f'max="{len(shown) - 1}" value="{len(shown) - 1}" aria-label="epoch">'
        '<button type="button" id="grid-next" aria-label="next epoch">&rarr;</button>'
        '<span id="grid-label"></span></div>'
        f'<div class="grid-frame">{images}</div></section>'
    )


def _within_budget(paths: list[Path], sizes: list[int]) -> list[Path]:
    """All of `paths` when their sizes fit GRID_BUDGET, else evenly spaced ones that do
    (always the first and the last)."""
    if sum(sizes) <= GRID_BUDGET or len(paths) <= 2:
        return paths
    average = sum(sizes) / len(sizes)
    count = max(2, int(GRID_BUDGET // average))
    while count > 2:
        picks = sorted({round(i * (len(paths) - 1) / (count - 1)) for i in range(count)})
        if sum(sizes[i] for i in picks) <= GRID_BUDGET:
            return [paths[i] for i in picks]
        count -= 1
    return [paths[0], paths[-1]]


PREVIEW_LIMIT = 64 << 20  # bytes: samples.png and interpolation.png are a few hundred kB


def _previews(run: RunDirectory) -> str:
    parts = []
    for path, caption in (
        (run.samples, "Samples drawn from the latent space (as <code>aecli sample</code>)"),
        (
            run.interpolation,
            "Interpolation (slerp) between two validation images "
            "(as <code>aecli interpolate</code>)",
        ),
    ):
        try:
            usable = path.is_file() and path.stat().st_size <= PREVIEW_LIMIT
        except OSError:
            usable = False
        if usable:
            parts.append(
                f'<figure><img class="preview" alt="{path.stem}" src="{_data_uri(path)}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    if not parts:
        return ""
    return f'<section id="previews"><h2>At the end of training</h2>{"".join(parts)}</section>'


def _config_section(run: RunDirectory) -> str:
    text = config_text(run)
    if text is None:
        return ""
    recorded = run.read_state()
    facts = recorded.model_dump(include={"started", "updated", "pid", "host"}, exclude_none=True)
    return (
        '<section id="config"><h2>Resolved configuration</h2>'
        f"<pre>{html.escape(text)}</pre>"
        f"<details><summary>state.json</summary><pre>{html.escape(json.dumps(facts, indent=1))}"
        "</pre></details></section>"
    )


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
  color: #1b1b1b; background: #fff; max-width: 1480px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table.facts th { text-align: left; padding: 2px 16px 2px 0; color: #555; font-weight: 600; }
table.facts td { padding: 2px 0; }
.note { color: #555; font-size: 0.9em; }
.resume code, pre { background: #f4f4f4; padding: 2px 6px; border-radius: 3px; }
pre { padding: 10px; overflow-x: auto; font-size: 0.85em; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure.curve { margin: 0; border: 1px solid #e4e4e4; border-radius: 4px; padding: 4px; }
svg.chart { font-size: 11px; }
svg .title { font-weight: 600; font-size: 12px; }
svg .tick, svg .axis { fill: #555; }
svg .grid { stroke: #ececec; stroke-width: 1; }
svg polyline { fill: none; stroke-width: 1.6; }
svg .train polyline { stroke: #1f6fb4; } svg .train circle { fill: #1f6fb4; }
svg .val polyline { stroke: #e0711b; } svg .val circle { fill: #e0711b; }
svg .window polyline { stroke: #9cc3e6; stroke-width: 1; }
figcaption { font-size: 0.85em; color: #444; }
.key { margin-right: 12px; } .key::before { content: ""; display: inline-block; width: 14px;
  height: 3px; margin: 0 4px 3px 0; vertical-align: middle; }
.key.train::before { background: #1f6fb4; } .key.val::before { background: #e0711b; }
.key.window::before { background: #9cc3e6; }
.stepper { display: flex; align-items: center; gap: 8px; margin-bottom: 8px; }
.stepper input { width: 320px; }
.grid-frame img, img.preview { image-rendering: pixelated; max-width: 100%; }
"""

SCRIPT = """
(function () {
  var images = document.querySelectorAll(".grid-image");
  var slider = document.getElementById("grid-slider");
  if (!slider || !images.length) return;
  var label = document.getElementById("grid-label");
  function show(i) {
    i = Math.max(0, Math.min(images.length - 1, i));
    slider.value = i;
    images.forEach(function (img, j) { img.hidden = j !== i; });
    label.textContent = "epoch " + images[i].dataset.epoch;
  }
  slider.addEventListener("input", function () { show(Number(slider.value)); });
  document.getElementById("grid-prev").addEventListener("click", function () {
    show(Number(slider.value) - 1);
  });
  document.getElementById("grid-next").addEventListener("click", function () {
    show(Number(slider.value) + 1);
  });
  show(Number(slider.value));
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{heading}</h1>
{body}
<script>{script}</script>
</body>
</html>
"""

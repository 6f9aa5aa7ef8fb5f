"""`aecli stats`: per-channel mean and standard deviation of a latent folder's latents."""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Annotated

import typer
from rich.table import Table

from aecli.cli.options import Json
from aecli.cli.render import key_value_table, print_json, progress_bar, results

EXAMPLES = """
[bold]Examples[/bold]

  aecli stats in1k/
  aecli stats in1k/ --flip --json
  aecli stats flux2-latents/ --unscaled --patch 2
  aecli export vae/ --latent-stats in1k/ -o my-vae/
"""

# a row per channel up to this many; beyond, their range (every channel is in --json)
CHANNEL_ROWS = 32


def stats(
    folder: Annotated[
        Path,
        typer.Argument(
            metavar="FOLDER",
            help="A latent folder (`aecli encode WEIGHTS IMAGES -o DIR/`).",
            show_default=False,
        ),
    ],
    flip: Annotated[
        bool,
        typer.Option(
            "--flip",
            help="Count the mirror images' latents too (latents_flip: `aecli encode --flip`).",
        ),
    ] = False,
    unscaled: Annotated[
        bool,
        typer.Option(
            "--unscaled",
            help="Undo the scaling the folder records (`aecli encode --scaled`): statistics of "
            "the model's raw latents, which `aecli export --latent-stats` writes.",
        ),
    ] = False,
    patch: Annotated[
        int,
        typer.Option(
            "--patch",
            min=1,
            max=8,
            metavar="N",
            help="Per channel of the latents in N x N patches (C N^2 channels, in the order of "
            "FLUX.2's patchify; its BatchNorm statistics are over 2 x 2).",
        ),
    ] = 1,
    as_json: Json = False,
) -> None:
    """Per-channel mean and standard deviation of every latent in a latent folder.

    Spatial latents (C, H, W): per channel over all images and positions; vector latents: per
    dimension; also over all channels (what one scaling factor uses). Where the folder stores
    the posterior's standard deviation (`encode --store moments`), also the spread of draws from
    the posterior, sqrt(var(mean) + mean(std^2)): what a trainer that draws every epoch sees.
    Read shard by shard in float64, in memory bounded by a shard."""
    from aecli.errors import UsageError
    from aecli.io.latent_folder import LatentFolder
    from aecli.io.latents import LatentFileError
    from aecli.stats import folder_statistics

    if not folder.exists():
        raise LatentFileError("not found", path=folder)
    if not folder.is_dir():
        raise UsageError(
            "a file: aecli stats reads a latent folder (`aecli encode WEIGHTS IMAGES -o DIR/`)",
            path=folder,
        )
    opened = LatentFolder.open(folder)
    with progress_bar(opened.count, "reading") as advance:
        found = folder_statistics(
            opened, flip=flip, patch=patch, unscale=unscaled, progress=advance
        )
    scaled = opened.scaling is not None and not unscaled
    report = {
        "folder": str(folder),
        "fingerprint": opened.fingerprint,
        "store": opened.settings.get("store"),
        "scaling": None if opened.scaling is None else opened.scaling.record(),
        "scaled": scaled,
        "flip": flip,
        "patch": patch,
        "images": int(found["images"]),
        "values_per_channel": int(found["values"]),
        "spatial": all(len(shape) == 3 for shape in opened.shapes),
        "channels": len(found["mean"]),
        "mean": found["mean"].tolist(),
        "std": found["std"].tolist(),
        "draw_std": found["draw_std"].tolist() if "draw_std" in found else None,
        "overall": {
            "mean": float(found["overall_mean"]),
            "std": float(found["overall_std"]),
            "rms": float(found["overall_rms"]),
            "draw_std": float(found["overall_draw_std"]) if "draw_std" in found else None,
        },
    }
    if as_json:
        print_json(report)
        return
    results.print(key_value_table(str(folder), _rows(report, opened)))
    results.print(_channel_table(report))


def _rows(report: dict, folder) -> list[tuple[str, str]]:
    """The folder and the figures over all channels, as `aecli info` lists facts."""
    shapes = ", ".join(f"{n:,} of {'x'.join(map(str, s))}" for s, n in folder.shapes.items())
    mirrored = f", and their {folder.count:,} mirror images" if report["flip"] else ""
    channels = f"{report['channels']} {'channels' if report['spatial'] else 'dimensions'}"
    if report["patch"] > 1:
        channels += f" of {report['patch']}x{report['patch']} patches"
    if folder.scaling is None:
        scaling = "none: the model's raw latents"
    elif report["scaled"]:
        scaling = f"{folder.scaling.describe()}: the figures are of the scaled latents"
    else:
        scaling = f"{folder.scaling.describe()}, undone: the figures are of the raw latents"
    overall = report["overall"]
    draws = overall["draw_std"] is not None
    rows = [
        ("model", report["fingerprint"] or "unknown"),
        ("latents", f"{folder.count:,} ({shapes}){mirrored}"),
        ("stored", STORED.get(report["store"], "latents (sampled or encoded)")),
        ("scaling", scaling),
        (UNIT[report["spatial"]], f"{channels}, {report['values_per_channel']:,} values each"),
        (
            "all channels" if report["spatial"] else "all dimensions",
            f"mean {overall['mean']:.6g}, std {overall['std']:.6g}"
            + (" (of the posterior means)" if draws else "")
            + f", rms {overall['rms']:.6g}",
        ),
    ]
    if draws:
        rows.append(
            (
                "posterior draws",
                f"std {overall['draw_std']:.6g} over all channels: sqrt(var(mean) + "
                "mean(std^2)), what a trainer that draws every epoch sees",
            )
        )
    return rows


UNIT = {True: "per channel", False: "per dimension"}
STORED = {
    "mean": "the posterior's mean (a deterministic model's codes)",
    "moments": "the posterior's mean, and its std (latents_std)",
    "sample": "a draw from the posterior",
}


def _channel_table(report: dict) -> Table:
    """A row per channel, or the lowest, median and highest figure of many channels."""
    draws = report["draw_std"] is not None
    columns = [("mean", report["mean"]), ("std of means" if draws else "std", report["std"])]
    if draws:
        columns.append(("std of draws", report["draw_std"]))
    count = report["channels"]
    few = count <= CHANNEL_ROWS
    unit = UNIT[report["spatial"]]
    title = unit.capitalize() + ("" if few else f" ({count}: their range; each with --json)")
    table = Table(title=title, title_justify="left")
    table.add_column(unit.split()[1] if few else "", justify="right")
    for name, _ in columns:
        table.add_column(name, justify="right")
    if few:
        for channel in range(count):
            table.add_row(str(channel), *(f"{values[channel]:.6g}" for _, values in columns))
        return table
    for label, pick in (("lowest", min), ("median", median), ("highest", max)):
        table.add_row(label, *(f"{pick(values):.6g}" for _, values in columns))
    return table

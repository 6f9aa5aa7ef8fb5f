"""`aecli sample` and `aecli interpolate`: new images from the latent space."""

from __future__ import annotations

import secrets
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.options import (
    BatchSize,
    Columns,
    Device,
    Format,
    Json,
    Overwrite,
    Weights,
    parse_size,
    seed_value,
)
from aecli.cli.render import console, print_json, progress_bar, shown
from aecli.errors import UsageError

SAMPLE_EXAMPLES = """
[bold]Examples[/bold]

  aecli sample model.safetensors -n 16 -o samples.png
  aecli sample model.safetensors -n 8 --class circle --seed 1 -o circles.png
  aecli sample model.safetensors -n 100 -o samples/ --latents-out z.npy
  aecli sample vae/ -n 100000 --latents-out sampled/
  aecli sample runs/x -n 8 --latents-out - | aecli decode runs/x - -o out/
  aecli sample kl-f8.safetensors -n 4 --size 512x384 -o big.png
"""

INTERPOLATE_EXAMPLES = """
[bold]Examples[/bold]

  aecli interpolate model.safetensors a.png b.png -o path.png
  aecli interpolate vae/ a.png b.png --mode slerp --gif a-b.gif -o a-b.png
  aecli interpolate model.safetensors a.safetensors b.png --steps 5 -o frames/
  aecli interpolate vae/ latents/#cats/001.jpg latents/#17 -o path.png
"""


class Mode(str, Enum):
    lerp = "lerp"
    slerp = "slerp"


def sample(
    weights: Weights,
    count: Annotated[
        int, typer.Option("-n", "--count", min=1, metavar="N", help="How many to draw.")
    ] = 16,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="A .png file (one grid of all samples) or a folder (one PNG per sample).",
            show_default=False,
        ),
    ] = None,
    latents_out: Annotated[
        str | None,
        typer.Option(
            "--latents-out",
            metavar="LATENTS-OUT",
            help="Write the sampled latents as a latent file (.safetensors or .npy), a latent "
            "folder (any other name; shards and index.json, as `aecli encode -o DIR/`), or - "
            "for stdout; instead of -o, or as well.",
            show_default=False,
        ),
    ] = None,
    class_name: Annotated[
        str | None,
        typer.Option(
            "--class",
            metavar="CLASS-NAME",
            help="Sample around one class's training latents: a class name or its index "
            "(`aecli info WEIGHTS` lists them).",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature",
            min=0.0,
            metavar="X",
            help="Scales the spread around the mean: 0 gives the mean itself, below 1 typical "
            "samples, above 1 unusual ones.",
        ),
    ] = 1.0,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            callback=seed_value,
            metavar="N",
            help="Seed for the draw; the same seed gives byte-identical output. "
            "Default: a random one, printed so that the run can be repeated.",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            metavar="SIZE",
            help="Image size HxW for models with spatial latents that take any size "
            "(a multiple of their downsampling factor). Default: the training size.",
            show_default=False,
        ),
    ] = None,
    columns: Columns = 8,
    fmt: Format = None,
    overwrite: Overwrite = False,
    batch_size: BatchSize = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Generate new images from the latent space.

    A VAE draws z from its prior N(0, I); a plain autoencoder from a Gaussian with the mean and
    covariance of its training latents, stored in the weights file when training finished.
    --class draws from one class's Gaussian instead (for a VAE too). Spatial latents are drawn
    position by position over their channels.
    """
    from aecli.inference import (
        Predictor,
        decoded_images,
        decoded_names,
        image_outputs,
        is_grid,
        write_images,
    )
    from aecli.inference.generate import resolve_class, sample_latents
    from aecli.inference.latents import latent_format, write_latent_target
    from aecli.io.latents import STDIO
    from aecli.io.outputs import OutputGuard

    if out is None and latents_out is None:
        raise UsageError("nothing to do: give -o FILE.png|DIR, --latents-out FILE|-, or both")
    if as_json and latents_out == STDIO:
        raise UsageError("--json: stdout carries the latent file with --latents-out -; drop one")
    image_size = parse_size(size) if size is not None else None
    fmt = latent_format("--latents-out", latents_out, fmt)
    predictor = Predictor(weights, device)
    batch_size = predictor.batch_size(batch_size)
    class_index = None
    if class_name is not None:
        class_index = resolve_class(class_name, predictor.info.class_names)
    seed = secrets.randbelow(2**31) if seed is None else seed
    start = time.perf_counter()
    latents, distribution = sample_latents(
        predictor,
        count,
        class_index=class_index,
        temperature=temperature,
        seed=seed,
        size=image_size,
    )
    names = decoded_names(latents.sources, count)
    outputs = image_outputs(out, names) if out is not None else []
    guard = OutputGuard([weights])
    if out is not None:
        guard.check("-o", outputs, overwrite=overwrite, out_dir=None if is_grid(out) else out)
    if latents_out is not None:
        settings = {"sampled_from": distribution.description, "seed": seed}
        settings["temperature"] = temperature
        write_latent_target(
            "--latents-out", latents_out, latents, fmt, guard, overwrite=overwrite,
            weights=weights, settings=settings,
        )  # fmt: skip
    if out is not None:
        with progress_bar(count, "decoding") as advance:
            images = decoded_images(
                predictor, latents.latents, batch_size=batch_size, progress=advance
            )
            write_images(images, out, names, columns=columns)
    seconds = time.perf_counter() - start
    class_label = None if class_index is None else predictor.info.class_names[class_index]
    _print_sampled(
        weights, latents, distribution, class_label, outputs, out=out, latents_out=latents_out,
        temperature=temperature, seed=seed, seconds=seconds, as_json=as_json,
    )  # fmt: skip


def _print_sampled(
    weights, latents, distribution, class_label, outputs, *, out, latents_out, temperature,
    seed, seconds, as_json,
) -> None:  # fmt: skip
    """What `sample` reports: one line (what was drawn, where it went), and --json."""
    from aecli.io.latents import STDIO

    count = len(latents.latents)
    targets = [str(out)] if out is not None else []
    if latents_out is not None:
        targets.append("stdout" if latents_out == STDIO else latents_out)
    console.print(
        f"sampled {count} from {shown(distribution.description)} (temperature {temperature:g}, "
        f"seed {seed}) -> {' and '.join(map(shown, targets))} in {seconds:.1f} s"
    )
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "count": count,
                "class": class_label,
                "temperature": temperature,
                "seed": seed,
                "distribution": distribution.description,
                "latent_shape": list(latents.latents.shape[1:]),
                "outputs": [str(o) for o in outputs],
                "latents_out": latents_out,
            }
        )


def interpolate(
    weights: Weights,
    a: Annotated[
        str,
        typer.Argument(
            metavar="A",
            help="Where the path starts: an image, a latent file with one latent "
            "(.safetensors or .npy; - for stdin), or one latent of a latent folder: DIR#NAME "
            "(its source name) or DIR#NUMBER.",
            show_default=False,
        ),
    ],
    b: Annotated[
        str, typer.Argument(metavar="B", help="Where the path ends: the same kinds as A.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="A .png file (the strip, A on the left) or a folder (one PNG per step).",
            show_default=False,
        ),
    ],
    steps: Annotated[
        int,
        typer.Option("--steps", min=2, metavar="N", help="Images on the path, A and B included."),
    ] = 8,
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode",
            metavar="lerp|slerp",
            help="lerp: a straight line. slerp: along the sphere around the prior's mean "
            "(the origin for a VAE), keeping away from the low-density middle.",
            case_sensitive=False,
        ),
    ] = Mode.lerp,
    gif: Annotated[
        Path | None,
        typer.Option(
            "--gif",
            metavar="PATH",
            help="Also write a looping animation, one frame per step.",
            show_default=False,
        ),
    ] = None,
    fps: Annotated[
        float,
        typer.Option(
            "--fps", min=0.1, max=50.0, metavar="X", help="Frames per second of the --gif."
        ),
    ] = 10.0,
    force: Annotated[
        bool,
        typer.Option("--force", help="Accept latent files that another model wrote."),
    ] = False,
    overwrite: Overwrite = False,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Morph one image into another through the latent space.

    A and B are encoded (images are resized to the model's input size; a VAE uses the posterior
    mean) and the path between their latents is decoded, A and B included, so the ends are A's
    and B's reconstructions.
    """
    from aecli.inference import (
        Predictor,
        decoded_images,
        image_outputs,
        is_grid,
        write_images,
    )
    from aecli.inference.generate import endpoint, interpolation_path, slerp_center
    from aecli.io.atomic import atomic_write_bytes
    from aecli.io.images import gif_bytes
    from aecli.io.latents import STDIO
    from aecli.io.outputs import OutputGuard

    if a == STDIO and b == STDIO:
        raise UsageError("A and B cannot both be read from stdin")
    predictor = Predictor(weights, device)
    reads = [weights, *(Path(p) for p in (a, b) if p != STDIO)]
    width = len(str(steps - 1))
    names = [f"step-{i:0{width}d}.png" for i in range(steps)]
    outputs = image_outputs(out, names)
    guard = OutputGuard(reads)
    guard.check("-o", outputs, overwrite=overwrite, out_dir=None if is_grid(out) else out)
    if gif is not None:
        guard.check("--gif", [gif], overwrite=overwrite)
    start = time.perf_counter()
    (za, kind_a), (zb, kind_b) = (endpoint(predictor, p, force=force) for p in (a, b))
    if za.shape != zb.shape:
        raise UsageError(
            f"A's latent {tuple(za.shape[1:])} and B's {tuple(zb.shape[1:])} differ in shape; "
            "the path needs both the same"
        )
    center = slerp_center(predictor) if mode == Mode.slerp else None
    path = interpolation_path(za[0], zb[0], steps, mode.value, center)
    frames = list(decoded_images(predictor, path))
    write_images(frames, out, names, columns=steps)
    if gif is not None:
        atomic_write_bytes(gif, gif_bytes(frames, fps))
    seconds = time.perf_counter() - start
    distance = float((zb - za).norm())
    console.print(
        f"interpolated {shown(a)} ({kind_a}) -> {shown(b)} ({kind_b}): {steps} steps, "
        f"{mode.value}, latent distance {distance:.3g} -> {shown(out)}"
        + (f" and {shown(gif)}" if gif is not None else "")
        + f" in {seconds:.1f} s"
    )
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "a": a,
                "b": b,
                "mode": mode.value,
                "steps": steps,
                "latent_distance": distance,
                "outputs": [str(o) for o in outputs],
                "gif": None if gif is None else str(gif),
            }
        )

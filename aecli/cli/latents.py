"""`aecli encode` and `aecli decode`: images to latent files and back, pipe-friendly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.app import app, guarded
from aecli.cli.options import (
    BatchSize,
    Columns,
    Device,
    Format,
    Inputs,
    Json,
    Overwrite,
    ScalingFactor,
    ShiftFactor,
    Tile,
    TileOverlap,
    Weights,
    Workers,
    parse_size,
)
from aecli.cli.render import (
    console,
    failure_rows,
    print_failures,
    print_json,
    progress_bar,
)

ENCODE_EXAMPLES = """
[bold]Examples[/bold]

  aecli encode model.safetensors photos/ -o latents.safetensors
  aecli encode m.safetensors a.png -o - | python edit.py | aecli decode m.safetensors - -o b/
  aecli encode vae.safetensors faces/ --sample --seed 3 -o z.npy
  aecli encode sd-vae-ft-mse/ photos/ --size native --scaled -o latents.safetensors
"""

DECODE_EXAMPLES = """
[bold]Examples[/bold]

  aecli decode model.safetensors latents.safetensors -o images/
  aecli decode model.safetensors z.npy -o grid.png
  aecli encode model.safetensors a.png -o - | aecli decode model.safetensors - -o out/
"""


@app.command(epilog=ENCODE_EXAMPLES)
@guarded
def encode(
    weights: Weights,
    inputs: Inputs,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="The latent file to write (.safetensors or .npy), or - for stdout.",
            show_default=False,
        ),
    ],
    sample: Annotated[
        bool,
        typer.Option("--sample", help="Draw z from a VAE's posterior instead of taking its mean."),
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=2**64 - 1, help="Seed for --sample.")
    ] = 0,
    size: Annotated[
        str,
        typer.Option(
            "--size",
            help="The size images are resized to: model (the model's input size), native "
            "(each image as it is; fully convolutional models, all images one size) or HxW.",
        ),
    ] = "model",
    scaled: Annotated[
        bool,
        typer.Option(
            "--scaled",
            help="Write (z - shift) * scale, as diffusion models consume latents, with the "
            "model's factors; the file records them and `aecli decode` undoes them.",
        ),
    ] = False,
    scaling_factor: ScalingFactor = None,
    shift_factor: ShiftFactor = None,
    tile: Tile = None,
    tile_overlap: TileOverlap = None,
    fmt: Format = None,
    overwrite: Overwrite = False,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Encode images into a latent file, or stream it to stdout with -o -.

    Each image is resized to the model's input size unless --size says otherwise. Subfolder
    names become labels, as for training. Unreadable files are named with the reason and
    skipped (exit status 1).
    """
    from aecli.errors import UsageError
    from aecli.inference import Predictor, collect_inputs, encode_files
    from aecli.io.latents import STDIO, output_format, write_latents
    from aecli.io.outputs import OutputGuard

    to_stdout = out == STDIO
    if to_stdout and as_json:
        raise UsageError("--json: stdout carries the latent file with -o -; drop one of them")
    predictor = Predictor(weights, device)
    batch_size = predictor.batch_size(batch_size)
    predictor.set_tiling(tile, tile_overlap, batch_size)
    if sample and not predictor.variational:
        raise UsageError(
            "--sample draws from a VAE's posterior; this model is a plain autoencoder",
            path=weights,
        )
    target_size = _encode_size(size, predictor)
    scaling = _scaling(predictor, scaled, scaling_factor, shift_factor)
    fmt = output_format(out, fmt)
    files, failures = collect_inputs(inputs)
    if not to_stdout:
        guard = OutputGuard([weights, *inputs], [f.path for f in files])
        guard.check("-o", [Path(out)], overwrite=overwrite)
    start = time.perf_counter()
    with progress_bar(len(files), "encoding") as advance:
        latents, read_failures = encode_files(
            predictor,
            files,
            size=target_size,
            sample=sample,
            seed=seed,
            scaling=scaling,
            batch_size=batch_size,
            workers=workers,
            progress=advance,
        )
    failures += read_failures
    print_failures(failures)
    if not len(latents):
        raise UsageError("no image could be read; nothing written")
    write_latents(out, latents, fmt)
    seconds = time.perf_counter() - start
    shape = tuple(latents.latents.shape)
    console.print(
        f"encoded {len(latents)} image{'s' * (len(latents) != 1)} -> "
        f"{'stdout' if to_stdout else out} ({fmt}, latents {shape}, "
        f"{'sampled' if sample else 'posterior mean' if predictor.variational else 'codes'}"
        + (f", scaled ×{scaling.scale:g} shift {scaling.shift:g}" if scaling else "")
        + ") "
        f"in {seconds:.1f} s" + (f"; [red]{len(failures)} failed[/red]" if failures else "")
    )
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "out": out,
                "format": fmt,
                "images": len(latents),
                "latent_shape": list(shape[1:]),
                "fingerprint": predictor.fingerprint,
                "labels": latents.labels is not None,
                "scaling": None
                if scaling is None
                else {"scale": scaling.scale, "shift": scaling.shift},
                "failed": failure_rows(failures),
            }
        )
    if failures:
        raise typer.Exit(1)


def _scaling(predictor, scaled: bool, scale: float | None, shift: float | None):
    """The latent scaling --scaled / --scaling-factor / --shift-factor ask for, or None."""
    if scaled or scale is not None or shift is not None:
        return predictor.latent_scaling(scale, shift)
    return None


def _encode_size(size: str, predictor) -> tuple[int, int] | None:
    """--size as (height, width), or None for native."""
    from aecli.errors import UsageError

    text = size.strip().lower()
    if text == "model":
        return predictor.size
    if text == "native":
        if not predictor.fully_convolutional:
            raise UsageError(
                f"--size native: this model takes images of {predictor.accepts} only "
                "(it is not fully convolutional)"
            )
        return None
    hw = parse_size(size)
    if max(hw) > 65536:
        raise UsageError(f"--size {size}: each side must be at most 65536 pixels")
    if hw != predictor.size and not predictor.fully_convolutional:
        raise UsageError(
            f"--size {size}: this model takes images of {predictor.accepts} only "
            "(it is not fully convolutional)"
        )
    return hw


@app.command(epilog=DECODE_EXAMPLES)
@guarded
def decode(
    weights: Weights,
    latent_file: Annotated[
        str,
        typer.Argument(
            help="A latent file (.safetensors from `aecli encode` / `aecli sample`, or .npy), "
            "or - to read it from stdin.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="A folder (one PNG per latent, named after its source) or a .png file "
            "(one grid of all of them).",
            show_default=False,
        ),
    ],
    columns: Columns = 8,
    scaled: Annotated[
        bool,
        typer.Option(
            "--scaled",
            help="The latents were scaled as diffusion models consume them: undo the model's "
            "factors first. Automatic for a latent file that records its scaling.",
        ),
    ] = False,
    scaling_factor: ScalingFactor = None,
    shift_factor: ShiftFactor = None,
    tile: Tile = None,
    tile_overlap: TileOverlap = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Decode latents that another model wrote (its shape must still fit)."
        ),
    ] = False,
    overwrite: Overwrite = False,
    batch_size: BatchSize = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Decode a latent file (or stdin) back into images: a folder of PNGs or one grid."""
    from aecli.inference import (
        Predictor,
        decoded_images,
        decoded_names,
        image_outputs,
        is_grid,
        write_images,
    )
    from aecli.io.latents import read_latents
    from aecli.io.outputs import OutputGuard

    latents = read_latents(latent_file)
    predictor = Predictor(weights, device)
    batch_size = predictor.batch_size(batch_size)
    predictor.set_tiling(tile, tile_overlap, batch_size)
    z = predictor.fit(latents, force=force)
    scaling = _scaling(predictor, scaled, scaling_factor, shift_factor) or latents.scaling
    if scaling is not None:
        z = scaling.undo(z)
    grid = is_grid(out)
    names = decoded_names(latents.sources, len(z))
    outputs = image_outputs(out, names)
    reads = [weights] + ([] if latent_file == "-" else [Path(latent_file)])
    OutputGuard(reads).check("-o", outputs, overwrite=overwrite, out_dir=None if grid else out)
    start = time.perf_counter()
    with progress_bar(len(z), "decoding") as advance:
        images = decoded_images(predictor, z, batch_size=batch_size, progress=advance)
        write_images(images, out, names, columns=columns)
    seconds = time.perf_counter() - start
    forced = latents.fingerprint not in (None, predictor.fingerprint)
    plural = "s" * (len(z) != 1)
    target = str(out) if grid else f"{out}/ ({len(z)} PNG{plural})"
    console.print(
        f"decoded {len(z)} latent{plural} from {latents.name} -> {target} in {seconds:.1f} s"
        + (" [yellow](--force: latents from another model)[/yellow]" if forced else "")
    )
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "latents": latents.name,
                "count": len(z),
                "latent_shape": list(z.shape[1:]),
                "outputs": [str(o) for o in outputs],
                "forced": forced,
                "unscaled": None
                if scaling is None
                else {"scale": scaling.scale, "shift": scaling.shift},
            }
        )

"""`aecli encode` and `aecli decode`: images to latent files and back, pipe-friendly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.options import (
    BatchSize,
    Columns,
    Device,
    Format,
    Inputs,
    Json,
    NoTile,
    Overwrite,
    ScalingFactor,
    ShiftFactor,
    Tile,
    TileFast,
    TileOverlap,
    Weights,
    Workers,
    parse_size,
    seed_value,
)
from aecli.cli.render import console, failure_rows, print_failures, print_json, progress_bar, shown

ENCODE_EXAMPLES = """
[bold]Examples[/bold]

  aecli encode model.safetensors photos/ -o latents.safetensors
  aecli encode runs/x a.png -o - | aecli decode runs/x - -o b.png
  aecli encode vae.safetensors faces/ --sample --seed 3 -o z.npy
  aecli encode sd-vae-ft-mse/ photos/ --size native --scaled -o z.safetensors
  aecli encode sd-vae-ft-mse/ imagenet/ --buckets 256 -o in1k/
  aecli encode sd-vae-ft-mse/ imagenet/ --buckets 256 -o in1k/ --resume
  aecli encode vae/ imagenet/ --flip --store moments --dtype bfloat16 -o in1k/
  torchrun --nproc_per_node=8 -m aecli encode vae/ imagenet/ -o in1k/
"""

DECODE_EXAMPLES = """
[bold]Examples[/bold]

  aecli decode model.safetensors latents.safetensors -o images/
  aecli decode model.safetensors z.npy -o grid.png
  aecli decode vae/ in1k/ -o images/
  aecli decode vae/ in1k/ -o some.png --select n01440764/x.JPEG --select 12
  aecli decode vae/ in1k/ -o mirrored/ --flip --select 0 --select 1
  aecli encode runs/x a.png -o - | aecli decode runs/x - -o out/
"""


def encode(
    weights: Weights,
    inputs: Inputs,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            metavar="OUT",
            help="A latent file (a name ending in .safetensors or .npy; held in memory until "
            "written), - for stdout, or else a folder (latent shards written as they are "
            "encoded, and index.json; for data sets of any size).",
            show_default=False,
        ),
    ],
    store: Annotated[
        str,
        typer.Option(
            "--store",
            metavar="STORE",
            help="What to keep of a VAE's posterior: mean, sample (a draw from it) or moments "
            "(its mean as latents and its standard deviation as latents_std, for a fresh draw "
            "every epoch).",
        ),
    ] = "mean",
    sample: Annotated[
        bool,
        typer.Option("--sample", help="The same as --store sample."),
    ] = False,
    flip: Annotated[
        bool,
        typer.Option(
            "--flip",
            help="Encode each image's horizontal mirror image too, stored beside its latents "
            "as latents_flip (and latents_flip_std with --store moments).",
        ),
    ] = False,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="What the latents are stored in: float32, bfloat16 or float16 (half the disk; "
            "the encoder still computes in float32, only the stored values are rounded).",
        ),
    ] = "float32",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            metavar="PRECISION",
            help="What the encoder computes in: fp32, bf16 or auto (the model's own policy: "
            "bf16 autocast for large models on GPUs with bf16 tensor cores). Recorded in a "
            "folder's index.",
        ),
    ] = "fp32",
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            callback=seed_value,
            metavar="N",
            help="Seed for --sample (each image draws from its own generator: the same latents "
            "whatever the batch size, shards or processes).",
        ),
    ] = 0,
    size: Annotated[
        str,
        typer.Option(
            "--size",
            metavar="SIZE",
            help="The size images are resized to: model (the model's input size), native "
            "(each image as it is; fully convolutional models; a folder groups the shapes into "
            "shards, a latent file takes one) or HxW.",
        ),
    ] = "model",
    buckets: Annotated[
        str | None,
        typer.Option(
            "--buckets",
            metavar="BUCKETS",
            help="Aspect buckets, HxW,HxW,... or N for the preset of about NxN pixels (sides "
            "multiples of N/8, aspect ratios up to 5:2): each image is resized to cover the "
            "bucket nearest its aspect ratio, then centre-cropped to it.",
            show_default=False,
        ),
    ] = None,
    shard_size: Annotated[
        int | None,
        typer.Option(
            "--shard-size",
            min=1,
            metavar="N",
            help="Latents per shard of a folder (and input files per unit of work, the most a "
            "kill can lose). Default: about 256 MiB of latents at the encode's size.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted encode into the folder -o: only what no complete "
            "shard holds is encoded.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="With --resume: continue a folder that other weights started."
        ),
    ] = False,
    scaled: Annotated[
        bool,
        typer.Option(
            "--scaled",
            help="Write (z - shift) * scale, as diffusion models consume them, with the "
            "model's factors; the file records them and `aecli decode` undoes them.",
        ),
    ] = False,
    scaling_factor: ScalingFactor = None,
    shift_factor: ShiftFactor = None,
    tile: Tile = None,
    no_tile: NoTile = False,
    tile_fast: TileFast = False,
    tile_overlap: TileOverlap = None,
    fmt: Format = None,
    overwrite: Overwrite = False,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Encode images into latents: a folder of shards for a data set, a latent file, or stdout.

    Each image is resized to the model's input size unless --size or --buckets say otherwise.
    Subfolder names become labels, as for training. Unreadable files are named with the reason
    and skipped (exit status 1). Into a folder, latents reach the disk shard by shard, memory
    stays the same whatever the number of images, a killed encode continues with --resume, and
    `torchrun --nproc_per_node=N -m aecli encode ...` encodes on N GPUs.
    """
    from aecli.devices import resolve_device
    from aecli.inference import Predictor, collect_inputs
    from aecli.inference.latents import EncodeSettings
    from aecli.io.latents import STDIO, names_folder, output_format
    from aecli.io.outputs import OutputGuard

    store, dtype, precision = _storage(store, sample, dtype, precision)
    to_stdout, folder = out == STDIO, names_folder(out)
    _check_output(
        out, fmt, folder, as_json=as_json, resume=resume, force=force, shard_size=shard_size,
        flip=flip, store=store, dtype=dtype,
    )  # fmt: skip
    resolved = resolve_device(device)
    dist = None
    if folder:
        from datetime import timedelta

        from aecli.distributed import setup_distributed

        # a rank that finishes first waits at the end for the others' last shards
        dist = setup_distributed(resolved, timeout=timedelta(days=7))
    try:
        predictor = Predictor(weights, resolved)
        predictor.set_precision(precision)  # before the batch size: bf16 halves activations
        batch_size = predictor.batch_size(batch_size)
        predictor.set_tiling(tile, tile_overlap, batch_size, fast=tile_fast, never=no_tile)
        _check_posterior(predictor, store, sample, weights)
        scaling = _scaling(predictor, scaled, scaling_factor, shift_factor)
        settings = EncodeSettings(
            _encode_size(size, predictor, buckets is not None),
            _buckets(buckets, predictor, 1 if scaling is None else scaling.patch),
            store=store,
            seed=seed,
            scaling=scaling,
            flip=flip,
            dtype=dtype,
            precision=precision,
        )
        files, failures = collect_inputs(inputs)
        guard = OutputGuard([weights, *inputs], [f.path for f in files])
        if folder:
            guard.check("-o", [], overwrite=overwrite, out_dir=Path(out))
            _encode_folder(
                predictor, files, failures, Path(out), settings, dist, roots=inputs,
                shard_size=shard_size, resume=resume, overwrite=overwrite, force=force,
                batch_size=batch_size, workers=workers, as_json=as_json,
            )  # fmt: skip
        else:
            if not to_stdout:
                guard.check("-o", [Path(out)], overwrite=overwrite)
            _encode_file(
                predictor, files, failures, out, output_format(out, fmt), settings,
                batch_size=batch_size, workers=workers, as_json=as_json,
            )  # fmt: skip
    finally:
        if dist is not None:
            dist.close()


def _storage(store: str, sample: bool, dtype: str, precision: str) -> tuple[str, str, str]:
    """--store (or --sample), --dtype and --precision, checked: (store, dtype, precision)."""
    from aecli.errors import UsageError
    from aecli.inference.latents import STORES
    from aecli.io.latents import STORAGE

    store, dtype, precision = (v.strip().lower() for v in (store, dtype, precision))
    for option, value, choices in (
        ("--store", store, STORES),
        ("--dtype", dtype, tuple(STORAGE)),
        ("--precision", precision, ("fp32", "bf16", "auto")),
    ):
        if value not in choices:
            raise UsageError(f"{option} {value}: choose {', '.join(choices)}")
    if sample and store not in ("mean", "sample"):
        raise UsageError(f"--sample is --store sample; it cannot go with --store {store}")
    return "sample" if sample else store, dtype, precision


def _check_output(
    out: str, fmt, folder: bool, *, as_json, resume, force, shard_size, flip, store, dtype
) -> None:
    """What -o is (a latent folder, a file, stdout) against the options that need another:
    refused in one line before anything loads."""
    from aecli.devices import torchrun_processes
    from aecli.errors import UsageError
    from aecli.io.latents import STDIO, output_format

    if out == STDIO and as_json:
        raise UsageError("--json: stdout carries the latent file with -o -; drop one of them")
    if force and not resume:
        raise UsageError("--force: continues a folder that other weights started; add --resume")
    if folder:
        if fmt not in (None, "safetensors"):
            raise UsageError(
                f"--format {fmt}: a latent folder holds safetensors shards; -o {out} names a "
                "folder (a latent file's name ends in .safetensors or .npy)"
            )
        return
    for option, given in (("--resume", resume), ("--force", force), ("--shard-size", shard_size)):
        if given:
            raise UsageError(f"{option}: for a latent folder (-o DIR/); -o {out} is one file")
    if torchrun_processes() is not None:
        raise UsageError(
            f"-o {out}: under torchrun each process writes its own shards into a latent "
            "folder; give -o DIR/"
        )
    if output_format(out, fmt) != "npy":
        return
    extra = [n for n, on in (("--flip", flip), ("--store moments", store == "moments")) if on]
    if extra:
        raise UsageError(
            f"-o {out}: a .npy file holds one array of latents; {' and '.join(extra)} store "
            "more arrays: write .safetensors or a folder"
        )
    if dtype == "bfloat16":
        raise UsageError(
            f"-o {out}: numpy has no bfloat16; write .safetensors or a folder, or give "
            "--dtype float16"
        )


def _check_posterior(predictor, store: str, sample: bool, weights) -> None:
    """--store sample / moments need a VAE's posterior: one line for a deterministic model."""
    from aecli.errors import UsageError

    if store == "mean" or predictor.variational:
        return
    what = "is deterministic" if predictor.family else "has no posterior"
    option = "--sample" if sample else f"--store {store}"
    draws = "draws from" if store == "sample" else "stores the mean and std of"
    raise UsageError(
        f"{option} {draws} a VAE's posterior; this model, {predictor.kind}, {what}",
        path=weights,
    )


def _kind(predictor, settings) -> str:
    """`posterior mean and std, with mirror images, bfloat16`: what an encode stored."""
    what = {"sample": "sampled", "moments": "posterior mean and std"}.get(settings.store)
    what = what or ("posterior mean" if predictor.variational else "codes")
    what += ", with mirror images" if settings.flip else ""
    return what + ("" if settings.dtype == "float32" else f", {settings.dtype}")


def _stored(settings) -> dict:
    """What --json says of what an encode stored."""
    return {
        "store": settings.store,
        "flip": settings.flip,
        "dtype": settings.dtype,
        "precision": settings.precision,
    }


def _encode_file(predictor, files, failures, out, fmt, settings, *, batch_size, workers, as_json):
    """Encode into one latent file (or stdout), held in memory until it is written."""
    from aecli.errors import UsageError
    from aecli.inference import encode_files
    from aecli.io.latents import STDIO, write_latents

    start = time.perf_counter()
    with progress_bar(len(files), "encoding") as advance:
        latents, read_failures = encode_files(
            predictor, files, settings, batch_size=batch_size, workers=workers, progress=advance
        )
    failures += read_failures
    print_failures(failures)
    if not len(latents):
        raise UsageError("no image could be read; nothing written")
    write_latents(out, latents, fmt)
    seconds = time.perf_counter() - start
    shape = tuple(latents.latents.shape)
    scaling = settings.scaling
    console.print(
        f"encoded {len(latents)} image{'s' * (len(latents) != 1)} -> "
        f"{'stdout' if out == STDIO else shown(out)} ({fmt}, latents {shape}, "
        f"{_kind(predictor, settings)}"
        + (f", scaled {scaling.describe()}" if scaling else "")
        + ") "
        f"in {seconds:.1f} s" + (f"; [red]{len(failures)} failed[/red]" if failures else "")
    )
    if as_json:
        print_json(
            {
                "weights": str(predictor.name),
                "out": out,
                "format": fmt,
                "images": len(latents),
                "latent_shape": list(shape[1:]),
                "fingerprint": predictor.fingerprint,
                "labels": latents.labels is not None,
                "scaling": None if scaling is None else scaling.record(),
                **_stored(settings),
                "failed": failure_rows(failures),
            }
        )
    if failures:
        raise typer.Exit(1)


def _encode_folder(
    predictor, files, failures, out, settings, dist, *, roots, shard_size, resume, overwrite,
    force, batch_size, workers, as_json,
):  # fmt: skip
    """Encode into a latent folder: shards as they are done, the index at the end."""
    from aecli.data.images import Failure
    from aecli.errors import Interrupted
    from aecli.inference.latents import FolderEncode, default_shard_size

    shard_size = shard_size or default_shard_size(predictor, settings)
    start = time.perf_counter()
    job = FolderEncode(
        predictor, files, out, settings, shard_size=shard_size, roots=roots, resume=resume,
        overwrite=overwrite, force=force, dist=dist,
    )  # fmt: skip
    label = "encoding" if dist.world == 1 else f"encoding (rank 0 of {dist.world})"
    try:
        if dist.main:
            with progress_bar(job.to_encode, label) as advance:
                job.run(batch_size=batch_size, workers=workers, progress=advance)
        else:
            job.run(batch_size=batch_size, workers=workers)
        index = job.finish(failures)
    except KeyboardInterrupt:
        done = len(job.writer.finished_units())
        raise Interrupted(
            f"{done} of {job.plan.units} units of work are on disk in {out} and kept; continue "
            f"with: {resume_command()}"
        ) from None
    finally:
        job.close()
    if index is None:
        return
    seconds = time.perf_counter() - start
    failed = [Failure(f["path"], f["reason"]) for f in index["failures"]]
    print_failures(failed)
    shapes = ", ".join(f"{s['count']} of {'x'.join(map(str, s['shape']))}" for s in index["shapes"])
    scaling = settings.scaling
    resumed = f"; {job.images_done} inputs were done already" if job.images_done else ""
    count = index["count"]
    console.print(
        f"encoded {count} image{'s' * (count != 1)} -> {shown(out)}/ ({len(index['shards'])} shard"
        f"{'s' * (len(index['shards']) != 1)} of up to {shard_size}: {shapes or 'none'}; "
        f"{_kind(predictor, settings)}"
        + (f", scaled {scaling.describe()}" if scaling else "")
        + f") in {seconds:.1f} s{resumed}"
        + (f"; [red]{len(failed)} failed[/red]" if failed else "")
    )
    if as_json:
        print_json(
            {
                "weights": str(predictor.name),
                "out": str(out),
                "format": "folder",
                "images": count,
                "shards": len(index["shards"]),
                "shard_size": shard_size,
                "shapes": index["shapes"],
                "fingerprint": predictor.fingerprint,
                "labels": index["class_names"] is not None,
                "scaling": index["settings"]["scaling"],
                "already_encoded": job.images_done,
                **_stored(settings),
                "failed": failure_rows(failed),
            }
        )
    if failed:
        raise typer.Exit(1)


def resume_command() -> str:
    """This command line as --resume continues it: --overwrite (which would start over)
    dropped, --resume added."""
    import shlex
    import sys

    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    return shlex.join(["aecli", *args, "--resume"])


def _scaling(predictor, scaled: bool, scale: float | None, shift: float | None):
    """The latent scaling --scaled / --scaling-factor / --shift-factor ask for, or None."""
    if scaled or scale is not None or shift is not None:
        return predictor.latent_scaling(scale, shift)
    return None


def _encode_size(size: str, predictor, bucketed: bool = False) -> tuple[int, int] | None:
    """--size as (height, width), or None for native."""
    from aecli.errors import UsageError

    text = size.strip().lower()
    if bucketed and text != "model":
        raise UsageError(f"--size {size} and --buckets: give one of them")
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
    if min(hw) < predictor.smallest_side:
        least = predictor.smallest_side
        raise UsageError(f"--size {size}: too small for this model (at least {least}x{least})")
    if hw != predictor.size and not predictor.fully_convolutional:
        raise UsageError(
            f"--size {size}: this model takes images of {predictor.accepts} only "
            "(it is not fully convolutional)"
        )
    return hw


def _buckets(text: str | None, predictor, patch: int = 1):
    """--buckets as Buckets: a list of HxW, or one number N for the preset around NxN; sides
    multiples of the downsampling factor times `patch` (the latent patches of --scaled)."""
    from aecli.errors import UsageError
    from aecli.inference.inputs import Buckets, bucket_preset

    if text is None:
        return None
    if not predictor.fully_convolutional:
        raise UsageError(
            f"--buckets: this model takes images of {predictor.accepts} only (it is not fully "
            "convolutional)"
        )
    f = predictor.factor * patch
    given = text.strip()
    if given.isdigit():
        side = int(given)
        if not 2 * f <= side <= 65536:
            raise UsageError(f"--buckets {text}: a preset side from {2 * f} to 65536 pixels")
        return Buckets(bucket_preset(side, f))
    sizes = []
    for part in given.split(","):
        hw = parse_size(part.strip(), "--buckets")
        if max(hw) > 65536 or hw[0] % f or hw[1] % f:
            raise UsageError(
                f"--buckets {part.strip()}: sides must be multiples of {f} (the model's "
                f"downsampling factor{' times the patches of --scaled' if patch > 1 else ''}), "
                "at most 65536"
            )
        if min(hw) < predictor.smallest_side:
            least = predictor.smallest_side
            raise UsageError(
                f"--buckets {part.strip()}: too small for this model (at least {least}x{least})"
            )
        if hw not in sizes:
            sizes.append(hw)
    if len(sizes) > 1024:
        raise UsageError(f"--buckets: {len(sizes)} buckets; give at most 1024")
    return Buckets(sizes)


def decode(
    weights: Weights,
    latent_file: Annotated[
        str,
        typer.Argument(
            metavar="LATENT_FILE",
            help="A latent file (.safetensors from `aecli encode` / `aecli sample`, or .npy), "
            "a latent folder (`aecli encode -o DIR/`, read shard by shard), or - for stdin.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="A folder (one PNG per latent, named after its source) or a .png file "
            "(one grid of all of them).",
            show_default=False,
        ),
    ],
    select: Annotated[
        list[str] | None,
        typer.Option(
            "--select",
            metavar="SELECT",
            help="From a latent folder, decode only this latent: its source name as the index "
            "lists it, or its number from 0 (-1: the last). Repeat for more.",
            show_default=False,
        ),
    ] = None,
    columns: Columns = 8,
    flip: Annotated[
        bool,
        typer.Option(
            "--flip",
            help="Decode the mirror images' latents (latents_flip, from `encode --flip`) "
            "instead of the images'.",
        ),
    ] = False,
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
    no_tile: NoTile = False,
    tile_fast: TileFast = False,
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
    """Decode a latent file, a latent folder or stdin back into images: a folder of PNGs or
    one grid. A latent folder is decoded shard by shard, in bounded memory."""
    from aecli.inference import (
        Predictor,
        decoded_images,
        decoded_names,
        image_outputs,
        is_grid,
        write_images,
    )
    from aecli.inference.latents import check_folder_fits
    from aecli.io.latents import STDIO
    from aecli.io.outputs import OutputGuard

    grid = is_grid(out)
    chunks, sources, fingerprint, shapes, recorded = _decode_source(latent_file, select, flip, grid)
    name = str(latent_file) if latent_file != STDIO else "stdin"
    predictor = Predictor(weights, device)
    batch_size = predictor.batch_size(batch_size)
    predictor.set_tiling(tile, tile_overlap, batch_size, fast=tile_fast, never=no_tile)
    override = _scaling(predictor, scaled, scaling_factor, shift_factor)
    if shapes is not None:  # a whole folder: every shape and the model checked before any work
        check_folder_fits(
            predictor, shapes, fingerprint, name, scaling=override or recorded, force=force
        )
    else:
        chunks = [_fitted(predictor, _side(chunks[0], flip), override, force)]
    count = len(sources) if sources is not None else len(chunks[0].latents)
    names = decoded_names(sources, count)
    outputs = image_outputs(out, names)
    reads = [weights] + ([] if latent_file == STDIO else [Path(latent_file)])
    OutputGuard(reads).check("-o", outputs, overwrite=overwrite, out_dir=None if grid else out)
    start = time.perf_counter()
    shape = None
    with progress_bar(count, "decoding") as advance:

        def images():
            nonlocal shape
            for chunk in chunks:
                chunk = _side(chunk, flip) if shapes is not None else chunk
                chunk = chunk if shapes is None else _fitted(predictor, chunk, override, force)
                shape = tuple(chunk.latents.shape[1:])
                yield from decoded_images(
                    predictor, chunk.latents, batch_size=batch_size, progress=advance
                )

        write_images(images(), out, names, columns=columns)
    seconds = time.perf_counter() - start
    forced = fingerprint not in (None, predictor.fingerprint)
    _print_decoded(
        weights, name, out, outputs, count=count, shape=shape, scaling=override or recorded,
        forced=forced, seconds=seconds, as_json=as_json,
    )  # fmt: skip


def _print_decoded(
    weights, name, out, outputs, *, count, shape, scaling, forced, seconds, as_json
) -> None:
    """What `decode` reports: one line (how many, from where, to where), and --json."""
    from aecli.inference import is_grid

    plural = "s" * (count != 1)
    target = str(out) if is_grid(out) else f"{out}/ ({count} PNG{plural})"
    console.print(
        f"decoded {count} latent{plural} from {shown(name)} -> {shown(target)} in {seconds:.1f} s"
        + (" [yellow](--force: latents from another model)[/yellow]" if forced else "")
    )
    if as_json:
        print_json(
            {
                "weights": str(weights),
                "latents": name,
                "count": count,
                "latent_shape": list(shape) if shape else None,
                "outputs": [str(o) for o in outputs],
                "forced": forced,
                "unscaled": None if scaling is None else scaling.record(),
            }
        )


GRID_MOST = 1024  # latents one grid (-o FILE.png) shows from a latent folder


def _decode_source(latent_file: str, select, flip: bool, grid: bool):
    """What `decode` reads, checked: (the latent files to decode in turn, their sources, the
    fingerprint of the model that wrote them, the shapes of a whole folder (None where there is
    one latent file: --select, a file, stdin), the scaling they record)."""
    from aecli.errors import UsageError
    from aecli.io.latent_folder import LatentFolder
    from aecli.io.latents import STDIO, read_latents

    if latent_file == STDIO or not Path(latent_file).is_dir():
        if select:
            raise UsageError("--select: picks latents from a latent folder (-o DIR/ of encode)")
        latents = read_latents(latent_file)
        return [latents], latents.sources, latents.fingerprint, None, latents.scaling
    folder = LatentFolder.open(latent_file)
    if flip and not folder.settings.get("flip"):
        raise UsageError(f"--flip: {latent_file} holds no latents_flip (encode with --flip)")
    if select:
        chosen = folder.select([folder.locate(s) for s in select])
        return [chosen], chosen.sources, folder.fingerprint, None, chosen.scaling
    _check_grid(grid, folder)
    return folder, folder.sources, folder.fingerprint, list(folder.shapes), folder.scaling


def _check_grid(grid: bool, folder) -> None:
    from aecli.errors import UsageError

    if not grid:
        return
    if folder.count > GRID_MOST:
        raise UsageError(
            f"-o FILE.png: {folder.name} holds {folder.count} latents, more than one grid "
            f"shows ({GRID_MOST}); decode into a folder, or pick some with --select"
        )
    if len(folder.shapes) > 1:
        raise UsageError(
            f"-o FILE.png: {folder.name} holds latents of {len(folder.shapes)} shapes; one grid "
            "needs one, decode into a folder or pick some with --select"
        )


def _side(latents, flip: bool):
    """The latents to decode: the images', or with --flip their mirror images'."""
    from dataclasses import replace

    from aecli.errors import UsageError

    if not flip:
        return latents
    if latents.flip is None:
        raise UsageError(
            f"--flip: {latents.name or 'the latents'} hold no latents_flip (encode with --flip)"
        )
    return replace(latents, latents=latents.flip, std=latents.flip_std)


def _fitted(predictor, latents, override, force):
    """A latent file's latents fitted to the model, scaling undone: the given factors, else
    the ones the file records."""
    from dataclasses import replace

    z = predictor.fit(latents, force=force, scaling=override or latents.scaling)
    return replace(latents, latents=z)

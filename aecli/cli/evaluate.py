"""`aecli eval`: PSNR, SSIM, LPIPS and rFID of a model's reconstructions, under declared
settings. Registered as the other commands are, from EXAMPLES (its --help epilog) and HELP."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from aecli.cli.options import BatchSize, Device, Inputs, Json, Weights, Workers, seed_value
from aecli.cli.render import (
    console,
    failure_rows,
    key_value_table,
    print_failures,
    print_json,
    print_warning,
    progress_bar,
    shown,
)

EXAMPLES = """
[bold]Examples[/bold]

  aecli eval sd-vae-ft-mse/ coco-val2017/ --size 256 --fid --lpips vgg
  aecli eval model.safetensors photos/ --json > eval.json
  aecli eval vae/ imagenet-val/ --size 256 --fid-weights inception.pth --lpips alex
  aecli eval vae/ photos/ --reconstructions recon/ --fid
"""


def evaluate(
    weights: Weights,
    inputs: Inputs,
    reconstructions: Annotated[
        Path | None,
        typer.Option(
            "--reconstructions",
            metavar="DIR",
            help="Measure the reconstructions in DIR instead of making them: one per input, "
            "matched by relative path with any image suffix (as `reconstruct -o DIR` writes "
            "them); a missing or extra name is refused. WEIGHTS is then recorded, not run.",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            metavar="SIZE",
            help="Resize each image's shorter side (bicubic) and crop its centre to SIZE (HxW, "
            "or one number: 256 as the published tables), before the model sees it. Default: "
            "each image at its own size (a model of one input size: stretched to it).",
            show_default=False,
        ),
    ] = None,
    lpips: Annotated[
        str | None,
        typer.Option(
            "--lpips",
            metavar="NET",
            help="Also measure LPIPS over alex (torchvision's AlexNet, as torchmetrics' default) "
            "or vgg (VGG16, as taming-transformers and latent diffusion). Its trunk's weights "
            "come from --lpips-weights or torch's hub cache; never downloaded.",
            show_default=False,
        ),
    ] = None,
    lpips_weights: Annotated[
        Path | None,
        typer.Option(
            "--lpips-weights",
            metavar="FILE",
            help="torchvision's ImageNet weights of the --lpips trunk (alexnet-owt-7be5be79.pth "
            "or vgg16-397923af.pth; .pth read with weights_only=True, or .safetensors).",
            show_default=False,
        ),
    ] = None,
    fid: Annotated[
        bool,
        typer.Option(
            "--fid",
            help="Also measure rFID: torch-fidelity's Inception (as torchmetrics runs it), 2048 "
            "features over all images, its weights from torch's hub cache "
            "(weights-inception-2015-12-05-6726825d.pth or pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth); never downloaded.",
        ),
    ] = False,
    fid_weights: Annotated[
        Path | None,
        typer.Option(
            "--fid-weights",
            metavar="FILE",
            help="The Inception weights for rFID, in torch-fidelity's layout (.pth read with "
            "weights_only=True, or .safetensors). Implies --fid.",
            show_default=False,
        ),
    ] = None,
    sample: Annotated[
        bool,
        typer.Option(
            "--sample",
            help="Decode a draw from each image's posterior (seeded per image by --seed) "
            "instead of its mean (a VAE).",
        ),
    ] = False,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            callback=seed_value,
            metavar="N",
            help="Seed for --sample: each image draws from its own generator, the same "
            "whatever the batch.",
        ),
    ] = 0,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            metavar="PRECISION",
            help="What the model computes in: fp32, bf16 or auto (the model's own policy). "
            "The metric networks always run in fp32.",
        ),
    ] = "fp32",
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Measure a model as the field reports autoencoders: PSNR, SSIM, and where asked LPIPS and
    rFID, with every setting the figures depend on named.

    The model reconstructs each image (the posterior's mean; --sample for a draw), or
    --reconstructions gives them. PSNR is the mean over images of 10 log10(255^2 / MSE) on
    the 8-bit images; SSIM is torchmetrics' (Gaussian window 11, sigma 1.5, data range 255);
    LPIPS is the lpips package's; rFID is torchmetrics' FID with torch-fidelity's Inception,
    reconstructions against originals. Nothing is downloaded: a metric asked for whose weights
    are missing stops the command before it starts, naming where aecli looked. Unreadable
    images are named and skipped (exit 1).
    """
    from aecli.errors import UsageError

    fid = fid or fid_weights is not None
    settings = _settings(size, lpips, lpips_weights, fid, fid_weights, sample, seed)
    precision = _checked(precision, reconstructions, sample, fid_weights, lpips_weights)
    from aecli.devices import describe, resolved
    from aecli.inference import Predictor, collect_inputs
    from aecli.inference import evaluate as core

    files, failures = collect_inputs(inputs)
    if settings.fid and len(files) < 2:
        raise UsageError(f"rFID needs at least 2 images; the inputs hold {len(files)}")
    predictor, where = None, resolved(device)
    # the metric networks first: a missing weights file stops the command before a large
    # model loads
    scores, networks = core.load_scores(settings, where)
    if reconstructions is not None:
        matched = core.match_reconstructions(files, reconstructions)
    else:
        predictor = Predictor(weights, where)
        predictor.set_precision(precision)
    with progress_bar(len(files), "evaluating") as advance:
        if predictor is None:
            result = core.evaluate_reconstructions(
                files, matched, settings, scores, where,
                batch_size=batch_size or 32, workers=workers, progress=advance,
            )  # fmt: skip
        else:
            result = core.evaluate_model(
                predictor, files, settings, scores,
                batch_size=predictor.batch_size(batch_size), workers=workers, progress=advance,
            )  # fmt: skip
    failures += result.failures
    declared = core.declared_settings(
        settings, networks, predictor=predictor, reconstructions=reconstructions
    )
    _render(result, declared, failures, describe(where), as_json,
            fid=settings.fid, weights=weights, inputs=inputs)  # fmt: skip
    if failures:
        raise typer.Exit(1)


def _render(
    result, declared: dict, failures: list, device: str, as_json: bool, *, fid: bool, **given
) -> None:
    """The figures for a person (a table, and the line to put beside a published row), then
    with --json for a program, every setting named."""
    from aecli.inference import evaluate as core

    line = core.comparable_line(result, declared) if result.rows else None
    print_failures(failures)
    console.print(key_value_table("Evaluation", _summary(result, declared, device)))
    if line is not None:
        console.print(shown(line), soft_wrap=True)
    note = core.fid_count_note(len(result.rows)) if fid else None
    if note is not None:
        print_warning(note)
    if as_json:
        print_json(
            {
                "weights": str(given["weights"]),
                "inputs": [str(i) for i in given["inputs"]],
                "images": len(result.rows),
                "failed": failure_rows(failures),
                "metrics": result.metrics,
                "image_size": result.image_size,
                "settings": declared,
                "device": device,
                "seconds": round(result.seconds, 3),
                "fid_seconds": round(result.fid_seconds, 3) if fid else None,
                "images_per_second": round(result.images_per_second, 3),
                "peak_memory_bytes": result.peak_memory,
                "peak_memory_measure": result.memory_measure,
                "line": line,
                "note": note,
                "rows": result.rows,
            }
        )


HELP = inspect.cleandoc(evaluate.__doc__ or "")


def _settings(size, lpips, lpips_weights, fid, fid_weights, sample, seed):
    """The options that say what is measured, checked before torch loads."""
    from aecli.cli.options import parse_size
    from aecli.errors import UsageError
    from aecli.inference.evaluate import LPIPS_NETS, EvalSettings

    if lpips is not None:
        lpips = lpips.strip().lower()
        if lpips not in LPIPS_NETS:
            raise UsageError(f"--lpips {lpips}: choose {' or '.join(LPIPS_NETS)}")
    elif lpips_weights is not None:
        raise UsageError("--lpips-weights: say which trunk it holds with --lpips alex or vgg")
    return EvalSettings(
        size=parse_size(size) if size is not None else None,
        lpips=lpips,
        lpips_weights=lpips_weights,
        fid=fid,
        fid_weights=fid_weights,
        sample=sample,
        seed=seed,
    )


def _checked(precision: str, reconstructions, sample: bool, *files) -> str:
    """--precision, checked against --reconstructions and --sample; the weights files named
    exist. Before torch loads."""
    from aecli.errors import UsageError

    precision = precision.strip().lower()
    if precision not in ("fp32", "bf16", "auto"):
        raise UsageError(f"--precision {precision}: choose fp32, bf16, auto")
    if reconstructions is not None:
        given = [o for o, on in (("--sample", sample), ("--precision", precision != "fp32")) if on]
        if given:
            raise UsageError(
                f"{' and '.join(given)}: for reconstructions aecli makes; --reconstructions "
                "measures given ones"
            )
        if not reconstructions.is_dir():
            raise UsageError(f"--reconstructions {reconstructions}: not a folder")
    for option, path in zip(("--fid-weights", "--lpips-weights"), files, strict=True):
        if path is not None and not path.is_file():
            raise UsageError(f"{option} {path}: not found")
    return precision


def _summary(result, declared: dict, device: str) -> list[tuple[str, str]]:
    """The table's rows: the figures, then what they were measured on and how."""
    metrics = result.metrics
    rows = []
    if "psnr" in metrics:
        rows.append(("PSNR", f"{metrics['psnr']:.2f} dB"))
    if "ssim" in metrics:
        rows.append(("SSIM", f"{metrics['ssim']:.4f}"))
    if "lpips" in metrics:
        rows.append((f"LPIPS ({declared['lpips']['net']})", f"{metrics['lpips']:.4f}"))
    if "rfid" in metrics:
        rows.append(("rFID", f"{metrics['rfid']:.3f}"))
    rows += [
        ("images", str(len(result.rows))),
        ("image size", result.image_size),
        ("resize", declared["resize"]),
        ("decoded", _decoded(declared)),
        ("precision", declared["precision"] or "-"),
        ("speed", f"{result.images_per_second:.3g} images/s on {device}"
         + (f"; rFID's statistics {result.fid_seconds:.1f} s" if "rfid" in metrics else "")),
        ("peak memory", f"{result.peak_memory / 2**20:.0f} MiB ({result.memory_measure})"),
    ]  # fmt: skip
    return rows


def _decoded(declared: dict) -> str:
    """What the figures measure: `posterior mean`, `posterior sample (seed 3)`, or the files."""
    posterior = declared["posterior"]
    if posterior == "sample":
        return f"posterior sample (seed {declared['seed']})"
    if posterior == "mean":
        return "posterior mean"
    return posterior or f"given: {declared['reconstructions']}"

"""`aecli train`: a preset, data, a progress bar, a run directory."""

from __future__ import annotations

from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
)
from rich.text import Text

from aecli.cli.options import Json, complete_preset, seed_value
from aecli.cli.render import console, fmt_metric, key_value_table, print_json, print_warning, shown

EXAMPLES = """
[bold]Examples[/bold]

  aecli train
  aecli train mnist-cae --data digits.npz --epochs 5
  aecli train cifar-cae --data images/ --set model.latent.dim=64
  aecli train my-preset.yaml --data photos/ --device cuda --json
  aecli train --init sd-vae-ft-mse/ --data photos/ --set train.freeze=encoder
  aecli train cifar-res --data images/ --log-to tensorboard
  aecli train cat-kl-f8 --data 'shards/{00000..00199}.tar' --out runs/kl
"""


class LogTarget(str, Enum):
    tensorboard = "tensorboard"


class RunTimeColumn(ProgressColumn):
    """The time since the run started. rich's TimeElapsedColumn stops its clock when a task
    first completes, and the bar's one task completes at the end of every epoch."""

    def render(self, task: Task) -> Text:
        return Text(str(timedelta(seconds=int(task.elapsed or 0))), style="progress.elapsed")


class RichReporter:
    """Renders the engine's progress: a live bar per run (steps of the epoch, the time since
    the run started) and one line per epoch."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            RunTimeColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.task = None
        self.epochs = 0

    def start(self, *, epochs: int, steps_per_epoch: int, first_epoch: int) -> None:
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=steps_per_epoch, epoch=first_epoch, epochs=epochs, loss="-", speed=""
        )

    def step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        shown = {"loss": f"{metrics['loss']:.4g}"} if "loss" in metrics else {}
        self.progress.update(self.task, completed=step, epoch=epoch, **shown)

    def notice(self, message: str) -> None:
        print_warning(message)  # the live bar redraws below it

    def epoch(self, record: dict) -> None:
        parts = "  ".join(f"{k} {fmt_metric(k, v)}" for k, v in epoch_metrics(record).items())
        self.progress.console.print(
            f"epoch {record['epoch']:>{len(str(self.epochs))}}/{self.epochs}  {parts}  "
            f"[dim]{record['images_per_s']:.0f} img/s[/dim]",
            highlight=False,
            soft_wrap=True,
        )
        speed = f"{record['images_per_s']:.0f} img/s"
        if record["epoch"] < self.epochs:  # the next epoch's bar; the last one's stays full
            self.progress.update(self.task, completed=0, epoch=record["epoch"] + 1, speed=speed)
        else:
            self.progress.update(self.task, speed=speed)

    def finish(self) -> None:
        self.progress.stop()


def train(
    preset: Annotated[
        str | None,
        typer.Argument(
            autocompletion=complete_preset,
            metavar="PRESET",
            help="A bundled preset name (see `aecli presets`) or a path to a YAML preset. "
            "Without one, `cifar-res` (alias `default`) trains on built-in data.",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            metavar="PATH",
            help="A folder of images (subfolders become class labels), WebDataset tar shards "
            "(one .tar, a folder of them, or a quoted brace pattern such as "
            "'shards/{00000..00099}.tar', always streamed from disk), MNIST IDX or CIFAR files, "
            "or a .npy / .npz array file. Folders too large for memory stream (data.stream). "
            "Without it, built-in coloured shapes are generated.",
            show_default=False,
        ),
    ] = None,
    val_data: Annotated[
        Path | None,
        typer.Option(
            "--val-data",
            metavar="PATH",
            help="A separate validation set (images held in memory: a folder, IDX, CIFAR or "
            "array file); nothing of --data is held out then.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="The run directory to write. Default: runs/PRESET-YYYYMMDD-HHMMSS.",
            show_default=False,
        ),
    ] = None,
    overrides: Annotated[
        list[str],
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override any preset key, e.g. --set model.latent.dim=32 "
            "(the value is parsed as YAML). Repeatable.",
            show_default=False,
        ),
    ] = [],  # noqa: B006  (Typer passes a new list on every call)
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, metavar="N", help="Shortcut for --set train.epochs=N."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", min=1, metavar="N", help="Shortcut for --set train.batch_size=N."
        ),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", metavar="X", help="Shortcut for --set optim.lr=X.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", callback=seed_value, metavar="N", help="Shortcut for --set train.seed=N."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            metavar="DEVICE",
            help="Where to train: auto (CUDA when present), cpu, cuda or cuda:N. Under torchrun "
            "each process takes cuda:LOCAL_RANK (or the CPU with --device cpu).",
        ),
    ] = "auto",
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="PATH",
            help="Continue the run in this directory from its checkpoint, with its own "
            "config.yaml and data; --epochs N sets a new total.",
            show_default=False,
        ),
    ] = None,
    data_changed: Annotated[
        bool,
        typer.Option(
            "--data-changed",
            help="With --resume: go on although the data differ from those the checkpoint "
            "trained on (images or shards added or removed), with a warning that the epoch in "
            "progress and the validation set change. Without it such a resume is refused.",
        ),
    ] = False,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            metavar="PATH",
            help="Start from these weights (aecli's, a diffusers AutoencoderKL, AutoencoderTiny "
            "or AutoencoderKLFlux2 folder, or a single-file VAE); their architecture must match "
            "the preset's tensor for tensor. Without a PRESET, the weights' own architecture and "
            "settings are used.",
            show_default=False,
        ),
    ] = None,
    log_to: Annotated[
        list[LogTarget],
        typer.Option(
            "--log-to",
            metavar="tensorboard",
            help="Also log to: tensorboard (scalars and grids under RUN/tensorboard; needs the "
            "tensorboard extra). Shortcut for --set train.log_to=[tensorboard]; allowed with "
            "--resume.",
            show_default=False,
        ),
    ] = [],  # noqa: B006  (Typer passes a new list on every call)
    as_json: Json = False,
) -> None:
    """Train an autoencoder from a preset and write a run directory.

    The run directory holds config.yaml (the resolved preset), model.safetensors (weights that
    every other command can use on their own), checkpoint.safetensors (to resume exactly),
    metrics.jsonl (a line per epoch and per logging window), grids/epoch-NNNN.png (validation
    images over their reconstructions), state.json (running, finished, stopped, interrupted or
    failed) and report.html (curves, grids and facts on one self-contained page, rewritten
    every epoch). Ctrl-C stops after the current step, saves, and prints the resume command.
    """
    from aecli.run.setup import TrainOptions, main_process, prepare

    main_rank = main_process()
    console.quiet = console.quiet or not main_rank  # under torchrun only rank 0 speaks
    options = TrainOptions(
        preset=preset,
        data=data,
        val_data=val_data,
        out=out,
        overrides=overrides,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        resume=resume,
        data_changed=data_changed,
        init=init,
        log_to=[t.value for t in log_to],
    )
    with prepare(options, reporter=RichReporter(), loading=console.status) as run:
        config, dataset = run.config, run.dataset
        source = dataset.source.get("path", "built-in shapes")
        console.print(
            f"{'Resuming' if run.plan is not None else 'Training'} [bold]{shown(run.name)}[/bold] "
            f"on {shown(source)} "
            f"({len(dataset)} images, {config.data.channels}x{config.data.size[0]}x"
            f"{config.data.size[1]}) on [bold]{run.device}[/bold] -> {shown(run.run_dir)}"
        )
        console.print(_data_path_line(dataset))
        if run.init is not None:
            console.print(f"Initialised from {shown(init)}: {shown(run.init.describe())}")
        if config.train.freeze != "none":
            console.print(f"The {config.train.freeze} is frozen (train.freeze).")
        result = run.fit()
        summary = _summary(result, run)
        _print_summary(result, summary)
        if as_json and main_rank:
            print_json(summary)


def _summary(result, run) -> dict:
    """What --json prints of a finished run."""
    return {
        "run_dir": str(result.run_dir),
        "weights": str(result.weights),
        "preset": run.name,
        "device": str(run.device),
        "epochs": result.epochs,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "images_per_s": round(result.images_per_s, 1),
        "fingerprint": result.fingerprint,
        "stopped_early": result.stopped_early,
        "best_epoch": result.best_epoch,
        "skipped_images": len(run.dataset.skipped) + len(result.skipped),
        "final": result.final,
    }


def _print_summary(result, summary: dict) -> None:
    """The table a person sees at the end of a run."""
    early = f" (stopped early; best epoch {result.best_epoch})" if result.stopped_early else ""
    rows = [
        ("run", result.run_dir),
        ("weights", result.weights),
        ("report", result.run_dir / "report.html"),
        ("epochs / steps", f"{result.epochs} / {result.steps}{early}"),
        ("time", f"{result.seconds:.1f} s ({result.images_per_s:.0f} img/s)"),
    ]
    if summary["skipped_images"]:
        rows.append(("skipped images", summary["skipped_images"]))
    rows += [(k, fmt_metric(k, v)) for k, v in epoch_metrics(result.final).items()]
    console.print(key_value_table("Training finished", rows))


def _data_path_line(dataset) -> str:
    """How the data reaches the model: streamed (and how) or held in memory."""
    from aecli.data.dataset import default_workers
    from aecli.data.stream import StreamedData

    if not isinstance(dataset, StreamedData):
        return "Data held in memory (decoded once)."
    workers = dataset.config.workers
    workers = default_workers() if workers is None else workers
    validation = len(dataset.validation)
    return (
        f"Data streamed from disk by {workers} worker process{'es' if workers != 1 else ''} "
        f"every epoch; {validation} validation image{'s' if validation != 1 else ''} in memory "
        "(data.stream)."
    )


def epoch_metrics(record: dict) -> dict:
    """The figures worth a glance: losses (each term when there are several), PSNR."""
    terms = [k for k in record if k.startswith("val_") and k not in ("val_loss", "val_psnr")]
    picked = ["loss"] + ([t[4:] for t in terms] if len(terms) > 1 else []) + ["val_loss"]
    picked += [t for t in terms if len(terms) > 1] + ["val_psnr"]
    return {k: record[k] for k in picked if k in record}

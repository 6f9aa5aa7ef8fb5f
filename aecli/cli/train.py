"""`aecli train`: a preset, data, a progress bar, a run directory."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path

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

from aecli.cli.app import app, guarded
from aecli.cli.options import complete_preset, seed_value
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


@app.command(epilog=EXAMPLES)
@guarded
def train(
    preset: str = typer.Argument(
        None,
        autocompletion=complete_preset,
        help="A bundled preset name (see `aecli presets`) or a path to a YAML preset. "
        "Without one, `cifar-res` (alias `default`) trains on built-in data.",
        show_default=False,
    ),
    data: Path = typer.Option(
        None,
        "--data",
        "-d",
        help="A folder of images (subfolders become class labels), WebDataset tar shards (one "
        ".tar, a folder of them, or a quoted brace pattern such as 'shards/{00000..00099}.tar', "
        "always streamed from disk), MNIST IDX or CIFAR files, or a .npy / .npz array file. "
        "Folders too large for memory stream (data.stream). Without it, built-in coloured "
        "shapes are generated.",
        show_default=False,
    ),
    val_data: Path = typer.Option(
        None,
        "--val-data",
        help="A separate validation set (images held in memory: a folder, IDX, CIFAR or array "
        "file); nothing of --data is held out then.",
        show_default=False,
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="The run directory to write. Default: runs/PRESET-YYYYMMDD-HHMMSS.",
        show_default=False,
    ),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help="Override any preset key, e.g. --set model.latent.dim=32 "
        "(the value is parsed as YAML). Repeatable.",
        show_default=False,
    ),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Shortcut for --set train.epochs=N."),
    batch_size: int = typer.Option(
        None, "--batch-size", min=1, help="Shortcut for --set train.batch_size=N."
    ),
    lr: float = typer.Option(None, "--lr", help="Shortcut for --set optim.lr=X."),
    seed: int = typer.Option(
        None, "--seed", callback=seed_value, help="Shortcut for --set train.seed=N."
    ),
    device: str = typer.Option(
        "auto",
        "--device",
        help="Where to train: auto (CUDA when present), cpu, cuda or cuda:N. Under torchrun "
        "each process takes cuda:LOCAL_RANK (or the CPU with --device cpu).",
    ),
    resume: Path = typer.Option(
        None,
        "--resume",
        help="Continue the run in this directory from its checkpoint, with its own config.yaml "
        "and data; --epochs N sets a new total.",
        show_default=False,
    ),
    data_changed: bool = typer.Option(
        False,
        "--data-changed",
        help="With --resume: go on although the data differ from those the checkpoint trained "
        "on (images or shards added or removed), with a warning that the epoch in progress and "
        "the validation set change. Without it such a resume is refused.",
    ),
    init: Path = typer.Option(
        None,
        "--init",
        help="Start from these weights (aecli's, a diffusers AutoencoderKL, AutoencoderTiny or "
        "AutoencoderKLFlux2 folder, or a single-file VAE); their architecture must match the "
        "preset's tensor for tensor. Without a PRESET, the weights' own architecture and "
        "settings are used.",
        show_default=False,
    ),
    log_to: list[LogTarget] = typer.Option(
        [],
        "--log-to",
        help="Also log to: tensorboard (scalars and grids under RUN/tensorboard; needs the "
        "tensorboard extra). Shortcut for --set train.log_to=[tensorboard]; allowed with "
        "--resume.",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Train an autoencoder from a preset and write a run directory.

    The run directory holds config.yaml (the resolved preset), model.safetensors (weights that
    every other command can use on their own), checkpoint.safetensors (to resume exactly),
    metrics.jsonl (a line per epoch and per logging window), grids/epoch-NNNN.png (validation
    images over their reconstructions), state.json (running, finished, stopped, interrupted or
    failed) and report.html (curves, grids and facts on one self-contained page, rewritten
    every epoch). Ctrl-C stops after the current step, saves, and prints the resume command.
    """
    from aecli.config import load_config, override_config

    shortcuts = {
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "optim.lr": lr,
        "train.seed": seed,
        "train.log_to": json.dumps([t.value for t in log_to]) if log_to else None,
    }
    settings = list(overrides) + [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    # the preset and every --set, read (and refused in one line) before torch loads; only a
    # run from --init weights without a PRESET takes its settings from those weights
    from_preset = resume is None and (init is None or preset is not None)
    loaded = load_config(preset, settings) if from_preset else None
    from aecli.data import load_data
    from aecli.devices import resolve_device
    from aecli.engine import Trainer, plan_resume
    from aecli.engine import train as run_training
    from aecli.errors import UsageError
    from aecli.io.outputs import make_folder, remove_if_empty
    from aecli.io.weights import init_weights, read_weights

    with contextlib.ExitStack() as held:  # the run folder's lock, for the run's life
        start = None  # the --init tensors that fit
        lock = None  # the run folder's, where this command made the folder
        main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
        console.quiet = console.quiet or not main_rank
        resolved_device = resolve_device(device)  # checked before the data loads
        if data_changed and resume is None:
            raise UsageError("--data-changed goes with --resume RUN")
        if resume is not None:
            given = (
                ("PRESET", preset),
                ("--init", init),
                ("--out", out),
                ("--set", overrides),
                ("--batch-size", batch_size),
                ("--lr", lr),
                ("--seed", seed),
            )
            extra = [flag for flag, value in given if value]
            if extra:
                raise UsageError(
                    f"--resume continues a run with its own config; drop {extra[0]} "
                    "(only --epochs, --data and --device may change)"
                )
            if main_rank:
                held.enter_context(run_lock(resume, "--resume"))
            plan = plan_resume(resume, epochs)
            if log_to:
                plan.config = _with_log_to(plan.config, log_to)
            config, name, run_dir = plan.config, plan.preset, resume
            data = data if data is not None else plan.data_path
            val_data = val_data if val_data is not None else plan.val_data_path
            _check_outside_data(run_dir, data, "--resume")
            created = None
        else:
            stored, init_tensors = read_weights(init) if init is not None else (None, None)
            if not from_preset:  # the weights' own architecture and settings
                raw = stored.config.model_dump(mode="json")
                loaded = override_config(raw, _init_name(init, stored), str(init), settings)
            config, name = loaded.config, loaded.name
            if config.loss.perceptual_weight:  # the LPIPS weights, before any data is read
                from aecli.perceptual import check_available

                check_available()
            if init_tensors is not None:
                start = init_weights(init, init_tensors, config)
                del init_tensors
            if "tensorboard" in config.train.log_to:  # before any data is read
                from aecli.engine.tensorboard import check_available as check_tensorboard

                check_tensorboard()
            run_dir = out or Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
            _check_outside_data(run_dir, data, "--out")
            # a path that cannot be a folder fails now, not after the data has loaded
            created = make_folder(run_dir, "--out")
            if main_rank:  # a live run is named as such, before what its files say
                lock = held.enter_context(run_lock(run_dir, "--out"))
            _check_run_dir(run_dir)

        try:
            with console.status("loading data"):
                dataset = load_data(data, config.data, config.train.seed, validation=val_data)
        except BaseException:
            if created is not None:  # a folder this command made goes, its lock file with it
                if lock is not None:
                    lock.release(remove=True)
                remove_if_empty(run_dir, created)
            raise
        for failure in dataset.skipped:
            print_warning(f"skipped {failure.path}: {failure.reason}")
        resumed = None
        if resume is not None:  # data other than the checkpoint's are refused before a word more
            resumed = Trainer.resumed(
                plan,
                dataset,
                run_dir,
                data_changed=data_changed,
                device=resolved_device,
                reporter=RichReporter(),
            )
        source = dataset.source.get("path", "built-in shapes")
        console.print(
            f"{'Resuming' if resume is not None else 'Training'} [bold]{shown(name)}[/bold] on "
            f"{shown(source)} "
            f"({len(dataset)} images, {config.data.channels}x{config.data.size[0]}x"
            f"{config.data.size[1]}) on [bold]{resolved_device}[/bold] -> {shown(run_dir)}"
        )
        console.print(_data_path_line(dataset))
        if start is not None:
            console.print(f"Initialised from {shown(init)}: {shown(start.describe())}")
        if config.train.freeze != "none":
            console.print(f"The {config.train.freeze} is frozen (train.freeze).")
        if resumed is not None:
            result = resumed.fit()
        else:
            data_path = None if data is None else str(Path(data).resolve())
            val_data_path = None if val_data is None else str(Path(val_data).resolve())
            result = run_training(
                config,
                dataset,
                run_dir,
                preset=name,
                device=resolved_device,
                reporter=RichReporter(),
                data_path=data_path,
                val_data_path=val_data_path,
                init=start.tensors if start is not None else None,
            )

        final = result.final
        summary = {
            "run_dir": str(result.run_dir),
            "weights": str(result.weights),
            "preset": name,
            "device": str(resolved_device),
            "epochs": result.epochs,
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "images_per_s": round(result.images_per_s, 1),
            "fingerprint": result.fingerprint,
            "stopped_early": result.stopped_early,
            "best_epoch": result.best_epoch,
            "skipped_images": len(dataset.skipped) + len(result.skipped),
            "final": final,
        }
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
        rows += [(k, fmt_metric(k, v)) for k, v in epoch_metrics(final).items()]
        console.print(key_value_table("Training finished", rows))
        if as_json and main_rank:
            print_json(summary)


def _data_path_line(dataset) -> str:
    """How the data reaches the model: streamed (and how) or held in memory."""
    from aecli.data.stream import StreamedData, default_workers

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


def _with_log_to(config, log_to: list[LogTarget]):
    """The run's config with --log-to given on resume (logging only: results are the same)."""
    from aecli.config import config_from_dict
    from aecli.engine.tensorboard import check_available as check_tensorboard

    raw = config.model_dump(mode="json")
    raw["train"]["log_to"] = [t.value for t in log_to]
    config = config_from_dict(raw, "--log-to")
    if "tensorboard" in config.train.log_to:
        check_tensorboard()
    return config


def _init_name(init: Path, stored) -> str:
    """A run's name when it takes its config from --init weights: their preset, or for an
    imported VAE the file or folder name."""
    if stored.data.get("kind") in ("diffusers", "single-file"):
        return Path(init).resolve().stem or "vae"
    return stored.preset


def epoch_metrics(record: dict) -> dict:
    """The figures worth a glance: losses (each term when there are several), PSNR."""
    terms = [k for k in record if k.startswith("val_") and k not in ("val_loss", "val_psnr")]
    picked = ["loss"] + ([t[4:] for t in terms] if len(terms) > 1 else []) + ["val_loss"]
    picked += [t for t in terms if len(terms) > 1] + ["val_psnr"]
    return {k: record[k] for k in picked if k in record}


def _check_outside_data(run_dir: Path, data: str | Path | None, option: str) -> None:
    """A run directory inside its data folder would feed its own grids back as training data."""
    from aecli.errors import UsageError
    from aecli.io.outputs import is_within

    if data is not None and Path(data).is_dir() and is_within(run_dir, data):
        raise UsageError(
            f"{option}: the run directory {run_dir} is inside the data folder {data}; its grids "
            "would become training data, choose a run directory outside it"
        )


def run_lock(run_dir: Path, option: str):
    """The run folder's lock, or the one-line refusal naming the process that holds it."""
    from aecli.engine.rundir import RUN_LOCK
    from aecli.io.locks import FolderLock

    refusal = f"{option} {run_dir}: another aecli train is running in this folder"
    return FolderLock(Path(run_dir), RUN_LOCK, refusal)


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds a run's weights or checkpoint; one left by a run that died
    before it saved anything is reused."""
    from aecli.engine import CHECKPOINT, WEIGHTS
    from aecli.engine.rundir import RunDirectory
    from aecli.errors import UsageError

    run = RunDirectory(run_dir)
    run.check_files()  # a FIFO in a run file's place: refused before the data load, not after
    if (run_dir / CHECKPOINT).exists():
        raise UsageError(
            f"--out: already holds a training run with a checkpoint; continue it with "
            f"`aecli train --resume {run_dir}`, or choose a new directory",
            path=run_dir,
        )
    if (run_dir / WEIGHTS).exists():
        raise UsageError(
            "--out: already holds a trained model; choose a new directory", path=run_dir
        )
    trained = len(run.history())
    if trained:  # its checkpoint is gone, but its record of training is worth keeping
        raise UsageError(
            f"--out: already holds a training run's metrics.jsonl ({trained} epochs, no "
            "checkpoint to resume from); choose a new directory",
            path=run_dir,
        )

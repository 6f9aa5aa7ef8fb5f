"""The training loop: epochs of steps, validation, early stopping, the final weights, Ctrl-C.

Data come through one interface (aecli.data.TrainingData): uint8 batches, indexed from a tensor
in memory (on the GPU when it fits) or decoded from disk; each step converts its batch to float
and trains on it (aecli.engine.step). Each epoch's order comes from the seed and the
epoch, so a checkpoint needs no RNG state and a resumed run is exact. The loop reads the steps'
results once per logging window: the one host sync that reports progress and catches a
non-finite loss or gradient. Under torchrun each rank trains on its own shard of every epoch's
order (DDP); only rank 0 writes files and reports progress.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from aecli.config import Config
from aecli.data import TrainingData, data_change
from aecli.data.transforms import to_uint8, to_unit
from aecli.devices import (
    NOT_DETERMINISTIC,
    Execution,
    ModelCost,
    available_memory,
    describe,
    deterministic,
    peak_flops,
    placed,
    resolved,
)
from aecli.distributed import setup_distributed
from aecli.engine.step import (
    TrainStep,
    deterministic_obstacle,
    learning_rate,
    load_optimizer_state,
)
from aecli.engine.tensorboard import TensorBoardLog
from aecli.engine.tensorboard import check_available as check_tensorboard
from aecli.errors import DataError, Interrupted, TrainingError, UsageError, first_line
from aecli.io.images import make_grid, save_png
from aecli.losses import compute_loss, psnr
from aecli.models import Autoencoder, build_model
from aecli.stats import latent_statistics


class Reporter(Protocol):
    """What the engine tells its caller (the CLI renders it with rich): `step` after every
    step, its `metrics` the logging window's means where one ends (train.log_every), else
    empty."""

    def start(self, *, epochs: int, steps_per_epoch: int, first_epoch: int) -> None: ...
    def step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None: ...
    def epoch(self, record: dict) -> None: ...
    def notice(self, message: str) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, **_: object) -> None: ...
    def step(self, **_: object) -> None: ...
    def epoch(self, record: dict) -> None: ...
    def notice(self, message: str) -> None: ...
    def finish(self) -> None: ...


class RunFiles(Protocol):
    """Where the loop's files go: config.yaml, metrics.jsonl, the grids, the weights, the
    checkpoint, state.json and report.html. The caller gives them (aecli.run's RunDirectory):
    the engine knows nothing of a run directory's layout, lock or report."""

    path: Path
    weights: Path
    checkpoint: Path
    samples: Path
    interpolation: Path

    def prepare(self, config: Config, *, fresh: bool) -> None: ...
    def write_state(self, state: str, **facts) -> None: ...
    def append_metrics(self, record: dict) -> None: ...
    def history(self) -> list[dict]: ...
    def trim_history(self, before_epoch: int, after_step: int) -> None: ...
    def write_grid(self, epoch: int, sheet: np.ndarray) -> None: ...
    def save_weights(self, model: Autoencoder, config: Config, **facts) -> str: ...
    def save_checkpoint(self, state: dict) -> None: ...
    def write_report(self) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    weights: Path
    epochs: int
    steps: int
    seconds: float
    images_per_s: float
    final: dict
    history: list[dict] = field(default_factory=list)
    fingerprint: str = ""
    stopped_early: bool = False
    best_epoch: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # streamed images that failed


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 1  # the epoch in progress, 1-based
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimiser steps so far
    images: int = 0  # training images seen so far
    seconds: float = 0.0  # training time so far
    best: float | None = None  # early stopping: best monitored value
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    finished: bool = False  # the final weights (with latent statistics) are written
    totals: dict[str, float] = field(default_factory=dict)  # this epoch's running loss sums
    skipped: int = 0  # this epoch's streamed images (on this rank) that failed to decode


class Window:
    """The steps since the last host sync: their results on the device, read in one go."""

    def __init__(self) -> None:
        self.results: list[torch.Tensor] = []
        self.weights: list[int] = []  # images in each step's batch
        self.first_step = 0
        self.sums: dict[str, float] = {}  # weighted loss terms of the logging window
        self.images = 0
        self.started = time.perf_counter()


class Trainer:
    """Fits one model on one data set and writes (or resumes) its run files."""

    def __init__(
        self,
        config: Config,
        data: TrainingData,
        run: RunFiles,
        *,
        preset: str,
        device: torch.device | str | None = None,
        reporter: Reporter | None = None,
        data_path: str | None = None,
        val_data_path: str | None = None,
        init: dict[str, torch.Tensor] | None = None,
    ):
        self.config, self.preset = config, preset
        self.run = run
        self.run_dir = run.path
        self.device = resolved(device)
        cuda_deterministic = config.train.deterministic and self.device.type == "cuda"
        obstacle = deterministic_obstacle(config) if cuda_deterministic else None
        if obstacle:
            raise UsageError(
                f"train.deterministic: {obstacle} has no deterministic CUDA kernel in PyTorch; "
                "set train.deterministic=false, or train on the CPU (--device cpu)"
            )
        self.dist = setup_distributed(self.device)
        self.reporter = reporter if reporter is not None and self.dist.main else SilentReporter()
        self.data_description, self.data_path = data.source, data_path
        self.val_data_path = val_data_path
        self.class_names = data.class_names
        self.train_data, self.val_data = data.split(config.data.val_fraction, config.train.seed)
        self.data_record = self.train_data.record(self.val_data)  # checked on resume
        self.skipped: dict[str, str] = {}  # streamed images that failed to decode: path, reason
        self.state = TrainState()
        self.fingerprint = ""
        self._stop_requested = False  # this process's Ctrl-C
        self._agreed_stop = False  # any rank's, as the ranks last agreed
        self._sigint_after_save = None  # the handler to restore once an interrupted run is recorded
        self.tensorboard: TensorBoardLog | None = None
        self._report_written, self._report_cost = 0.0, 0.0  # when, and how long it took
        if "tensorboard" in config.train.log_to and self.dist.main:
            check_tensorboard()  # before any data is placed or trained on
        self.execution = Execution.for_config(self.device, config)

        torch.manual_seed(config.train.seed)
        model = build_model(config)
        if init:  # checked against this architecture (io.weights.init_weights)
            model.load_state_dict(init)
        model.to(placed(self.device), memory_format=self.execution.memory_format)
        # every rank takes an equal shard of each epoch's order and an equal share of the batch
        n = len(self.train_data) // self.dist.world * self.dist.world
        self.shard_size = n // self.dist.world
        self.rank_batch = max(1, config.train.batch_size // self.dist.world)
        self.train_step = TrainStep(
            config,
            model,
            self.execution,
            rank=self.dist.rank,
            world=self.dist.world,
            batch_size=self.rank_batch,
            notice=self.reporter.notice,
        )
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.train_data = self.train_data.placed(self._place)
        self.val_images = self._place(self.val_data.images)
        self.grid_images = self.val_images[: config.train.grid_images]
        self.steps_per_epoch = math.ceil(self.shard_size / self.rank_batch)
        # model FLOPs utilisation (nanoGPT's MFU) where the GPU's peak is known
        self.peak = peak_flops(self.device, self.execution.autocast_dtype)
        if self.peak:  # counted once: the execution policy may have done it already
            cost = self.execution.cost or ModelCost.of(config)
            self.step_flops = 3 * cost.forward_flops
        else:
            self.step_flops = 0

    @property
    def model(self) -> Autoencoder:
        return self.train_step.model

    @property
    def ema(self) -> Autoencoder | None:
        return self.train_step.ema

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.train_step.optimizer

    @property
    def eval_model(self) -> Autoencoder:
        """The weights that are validated and exported: the EMA when there is one."""
        return self.ema if self.ema is not None else self.model

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        """The whole data set on the GPU when it fits in a quarter of free memory; else it stays
        in host memory, and each batch goes through pinned memory (Execution.to_device)."""
        if self.device.type != "cuda":
            return images
        if images.numel() < (available_memory(self.device) or 0) // 4:
            return images.to(self.device)
        return images

    def _batch(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The images at `index` (on the images' device) as model input."""
        return self.execution.prepare(images[index], self.config.data.range)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to the configured number of epochs (from where a restored checkpoint stood).

        state.json follows the run (running, then finished, stopped, interrupted or failed with
        the reason) and report.html is rewritten after every epoch and at the end."""
        try:
            with deterministic(
                self.config.train.deterministic, autotune=self.device.type == "cuda"
            ):
                try:
                    result = self._fit()
                except RuntimeError as exc:
                    if NOT_DETERMINISTIC not in str(exc):
                        raise
                    operation = first_line(exc).split()[0]
                    raise UsageError(
                        f"train.deterministic: PyTorch has no deterministic kernel for "
                        f"{operation} on {self.device}; set train.deterministic=false"
                    ) from exc
        except BaseException as exc:
            if self.dist.main:
                self._record_end(exc)
            if isinstance(exc, Interrupted):  # every rank stopped at the same step
                self.dist.close()
            raise
        else:
            self.dist.close()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self._sigint_after_save is not None:
                signal.signal(signal.SIGINT, self._sigint_after_save)
                self._sigint_after_save = None
        return result

    def _record_end(self, exc: BaseException) -> None:
        """state.json and the report of a run that ended on `exc`. What fails here is not
        allowed to hide `exc`."""
        if isinstance(exc, Interrupted | KeyboardInterrupt):
            state, reason = "interrupted", first_line(exc) or "interrupted"
        else:
            state, reason = "failed", first_line(exc) or type(exc).__name__
        with contextlib.suppress(Exception):
            self.run.write_state(state, reason=reason, checkpoint=self.run.checkpoint.exists())
            self._write_report()

    def _fit(self) -> TrainResult:
        train = self.config.train
        if self.dist.main:
            self.run.prepare(self.config, fresh=self.state.step == 0)
            self.run.write_state(
                "running",
                preset=self.preset,
                epochs=train.epochs,
                device=describe(self.device),
                execution=self.execution.describe(),
                data=self.data_description,
            )
            if "tensorboard" in train.log_to:
                self.tensorboard = TensorBoardLog(self.run_dir, from_step=self.state.step)
        history = self.run.history() if self.state.step else []
        self.state.finished = False
        self.reporter.start(
            epochs=train.epochs, steps_per_epoch=self.steps_per_epoch, first_epoch=self.state.epoch
        )
        previous_handler = self._catch_sigint()
        try:
            while self.state.epoch <= train.epochs and not self.state.stopped_early:
                record = self._train_epoch()
                record.update(self._validate())
                self._early_stopping(record)
                history.append(record)
                self.state.epoch += 1
                self.state.batch, self.state.totals, self.state.skipped = 0, {}, 0
                if self.dist.main:
                    self._log(record)
                    self._write_grid(record["epoch"])
                    self._save_weights(record)
                    self._save_checkpoint()
                    self._write_report(after_epoch=True)
                self.reporter.epoch(record)
        except Interrupted:
            # saved: a second Ctrl-C while fit records the end must not cut that short with a
            # KeyboardInterrupt (and lose the resume command); fit restores the handler after it
            self._sigint_after_save, previous_handler = previous_handler, None
            raise
        finally:
            self.reporter.finish()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        self._finish(history)
        return TrainResult(
            run_dir=self.run_dir,
            weights=self.run.weights,
            epochs=len(history),
            steps=self.state.step,
            seconds=self.state.seconds,
            images_per_s=self.state.images / max(self.state.seconds, 1e-9),
            final=history[-1] if history else {},
            history=history,
            fingerprint=self.fingerprint,
            stopped_early=self.state.stopped_early,
            best_epoch=self.state.best_epoch or None,
            skipped=self.skipped,
        )

    def _train_epoch(self) -> dict:
        train, state = self.config.train, self.state
        self.model.train()
        epoch = state.epoch
        self._totals = dict(state.totals)
        self._window = Window()
        total_steps = train.epochs * self.steps_per_epoch
        started = time.perf_counter()
        images_this_run = 0
        for i, images in self._epoch_batches(epoch):
            lr = learning_rate(self.config, state.step, total_steps, self.steps_per_epoch)
            if len(images):
                if not self._window.results:
                    self._window.first_step = state.step
                x = self.execution.prepare(images, self.config.data.range)
                self._window.results.append(self.train_step(x, state.step, lr))
                self._window.weights.append(len(images))
                state.step += 1
            state.batch = i + 1
            images_this_run += len(images) * self.dist.world
            last = i + 1 == self.steps_per_epoch
            synced = (i + 1) % train.log_every == 0 or last
            if not synced:  # the position only: the results stay on the device
                self.reporter.step(epoch=epoch, step=i + 1, metrics={})
            else:
                self._sync()
                window = self._window
                means = {k: v / window.images for k, v in window.sums.items()}
                self.reporter.step(epoch=epoch, step=i + 1, metrics=means)
                if self.dist.main:
                    now = time.perf_counter()
                    speed = window.images * self.dist.world / max(now - window.started, 1e-9)
                    self._log(
                        {"kind": "window", "epoch": epoch, "step": state.step, **means}
                        | {"lr": lr, "images_per_s": round(speed, 1)}
                    )
                    window.started = now
                window.sums, window.images = {}, 0
            if not last and train.checkpoint_every and state.step % train.checkpoint_every == 0:
                self._sync()
                state.totals = dict(self._totals)
                if self.dist.main:
                    self._save_checkpoint()
            if self._stopping(synced=synced):
                self._sync()
                state.totals = dict(self._totals)
                state.seconds += time.perf_counter() - started
                state.images += images_this_run
                self._save_on_interrupt()
        seconds = time.perf_counter() - started
        state.seconds += seconds
        state.images += images_this_run
        names = list(self._totals)
        # one sum over the ranks: the loss terms, and the streamed images that failed
        *sums, skipped = self.dist.sum([*(self._totals[k] for k in names), float(state.skipped)])
        totals = dict(zip(names, sums, strict=True))
        n = self.shard_size * self.dist.world - int(skipped)  # the images trained on
        record = {"kind": "epoch", "epoch": epoch, "step": state.step}
        record.update({k: v / n for k, v in totals.items()})
        record["lr"] = self.train_step.lr
        record["images_per_s"] = round(images_this_run / max(seconds, 1e-9), 1)
        if self.peak:  # per GPU: every rank runs on one
            per_gpu = record["images_per_s"] / self.dist.world
            record["mfu"] = round(per_gpu * self.step_flops / self.peak, 4)
        record["seconds"] = round(seconds, 3)
        return record

    def _rank_order(self, epoch: int) -> torch.Tensor | np.ndarray:
        """This rank's share of the epoch's order of training samples: every rank an equal
        share."""
        order = self.train_data.epoch_order(self.config.train.seed, epoch)
        return order[: self.shard_size * self.dist.world][self.dist.rank :: self.dist.world]

    def _epoch_batches(self, epoch: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch number, uint8 (B, C, H, W) images) of this rank's batches of the epoch, from
        the first one not trained yet (state.batch), which never reads the batches before it.
        An image that cannot be decoded is named once and left out of its batch."""
        batches = self.train_data.batches(
            self._rank_order(epoch),
            self.rank_batch,
            self.state.batch,
            seed=self.config.train.seed,
            epoch=epoch,
            pin_memory=self.execution.pins_memory,
        )
        for i, images, _, failures in batches:
            for failure in failures:
                if failure.path not in self.skipped:
                    self.skipped[failure.path] = failure.reason
                    self.reporter.notice(f"skipped {failure.path}: {failure.reason}")
                self.state.skipped += 1
            if not len(images) and self.dist.world > 1:
                raise TrainingError(
                    f"no image of batch {i + 1} on rank {self.dist.rank} could be decoded; "
                    "under torchrun every rank needs one to take the step"
                )
            yield i, images

    def _sync(self) -> None:
        """Read the window's step results (the host waits for the device here, once): stop on
        the first non-finite value, else add the loss terms to the epoch's and window's sums."""
        window = self._window
        if not window.results:
            return
        rows = torch.stack(window.results).tolist()
        labels = self.train_step.names
        bad = next((i for i, row in enumerate(rows) if not all(map(math.isfinite, row))), -1)
        bad_step = window.first_step + bad if bad >= 0 else -1
        # the ranks agree here on what each saw: a non-finite value, a Ctrl-C
        bad_step, stop = self.dist.max([bad_step, int(self._stop_requested)])
        self._agreed_stop = bool(stop)
        if bad_step >= 0:
            self._stop_non_finite(bad_step, rows[bad] if bad >= 0 else [], labels)
        terms = [name for name in labels if name != "gradient"]
        for row, weight in zip(rows, window.weights, strict=True):
            for name, value in zip(terms, row, strict=False):
                self._totals[name] = self._totals.get(name, 0.0) + value * weight
                window.sums[name] = window.sums.get(name, 0.0) + value * weight
            window.images += weight
        window.results, window.weights = [], []

    def _stopping(self, *, synced: bool) -> bool:
        """Whether to stop after this step for a Ctrl-C: at once in a single process; under
        torchrun at the step where the ranks last agreed (each window's sync), so that every
        rank stops at the same step and joins the same collectives."""
        if self.dist.world == 1:
            return self._stop_requested
        return synced and self._agreed_stop

    def _stop_non_finite(self, bad_step: int, row: list[float], labels: list[str]) -> None:
        bad = [not math.isfinite(v) for v in row]
        culprit = next((labels[i] for i, b in enumerate(bad) if b and labels[i] != "loss"), "loss")
        kept = self.run.checkpoint
        where = f"last good checkpoint kept: {kept}" if kept.exists() else "nothing was saved"
        step = f"step {bad_step + 1}: " if bad_step >= 0 else "on another rank: "
        raise TrainingError(
            f"{step}{'the ' if culprit == 'gradient' else 'loss term '}"
            f"'{culprit}' became non-finite (NaN or Inf); stopped ({where}). "
            "Try a lower optim.lr or set optim.grad_clip."
        )

    @torch.inference_mode()
    def _validate(self) -> dict:
        config, model = self.config, self.eval_model
        model.eval()
        totals: dict[str, torch.Tensor] = {}
        psnr_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = len(self.val_data)
        mine = torch.arange(self.dist.rank, n, self.dist.world, device=self.val_images.device)
        weight = 1.0
        if not len(mine):  # fewer images than ranks: one image counted 0 times, so that this
            mine, weight = mine.new_zeros(1), 0.0  # rank's sums have every key all the same
        for start in range(0, len(mine), config.train.batch_size):
            index = mine[start : start + config.train.batch_size]
            x = self._batch(self.val_images, index)
            with self.execution.autocast():
                out = model(x, sample=False)
            terms = compute_loss(
                out,
                x,
                config.loss,
                model.variational,
                value_range=config.data.range,
                perceptual=self.train_step.perceptual,
            )
            for name, value in terms.items():
                totals[name] = totals.get(name, 0) + value.double() * (weight * len(index))
            psnr_sum += (
                psnr(to_unit(out.image.float(), config.data.range), to_unit(x, config.data.range))
                .double()
                .sum()
                * weight
            )
        totals["psnr"] = psnr_sum
        return {f"val_{k}": float(v) / n for k, v in self.dist.reduce(totals).items()}

    def _early_stopping(self, record: dict) -> None:
        rule, state = self.config.train.early_stopping, self.state
        if rule is None or record["epoch"] < rule.start_epoch:
            return
        value = record[rule.monitor]
        sign = 1.0 if rule.monitor == "val_psnr" else -1.0  # higher PSNR, lower loss is better
        if state.best is None or sign * (value - state.best) > rule.min_delta:
            state.best, state.best_epoch, state.bad_epochs = value, record["epoch"], 0
            if rule.restore_best:
                self.best_weights = {
                    k: v.detach().clone() for k, v in self.eval_model.state_dict().items()
                }
        else:
            state.bad_epochs += 1
            state.stopped_early = state.bad_epochs >= rule.patience

    def _finish(self, history: list[dict]) -> None:
        """Restore the best weights if asked, add the latent statistics, write the weights."""
        rule = self.config.train.early_stopping
        if rule is not None and rule.restore_best and self.best_weights is not None:
            self.eval_model.load_state_dict(self.best_weights)
        labelled = self.train_data.labels is not None and self.class_names
        stats = latent_statistics(
            self.eval_model,
            self._statistics_batches(),
            len(self.class_names) if labelled else 0,
            self.dist.reduce,
        )
        if self.dist.main and history:
            record = history[-1]
            if rule is not None and rule.restore_best and self.state.best_epoch:
                record = next((r for r in history if r["epoch"] == self.state.best_epoch), record)
            self._save_weights(record, stats)
            self._write_previews(record["step"])
            # a run killed before this point has trained every epoch but can still be resumed
            # to write these final weights
            self.state.finished = True
            self._save_checkpoint()
            ended = "stopped" if self.state.stopped_early else "finished"
            reason = f"early stopping at epoch {history[-1]['epoch']}" if ended == "stopped" else ""
            self.run.write_state(
                ended, reason=reason, checkpoint=True, skipped_images=len(self.skipped)
            )
            self._write_report()
        self.dist.barrier()

    def _statistics_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(model input, labels) over the training images for the latent statistics, each rank
        its share of the data's statistics_samples (centre crops)."""
        data, labels = self.train_data, self.train_data.labels
        batches = data.batches(
            data.statistics_samples()[self.dist.rank :: self.dist.world],
            self.config.train.batch_size,
            0,
            seed=None,
            epoch=0,
            pin_memory=self.execution.pins_memory,
        )
        for _, images, samples, _ in batches:  # failures were named while training
            if len(images):
                y = None if labels is None else labels[samples]
                yield self.execution.prepare(images, self.config.data.range), y

    # -- files -------------------------------------------------------------------------------

    def _write_report(self, *, after_epoch: bool = False) -> None:
        """report.html. After an epoch only where the last write took under a tenth of the
        time since: a long run's report takes a fraction of a second to build, which very
        short epochs should not pay every time. At the end of the run, always."""
        started = time.perf_counter()
        if after_epoch and started - self._report_written < 9 * self._report_cost:
            return
        self.run.write_report()
        self._report_written = time.perf_counter()
        self._report_cost = self._report_written - started

    def _log(self, record: dict) -> None:
        """One metrics.jsonl record, to TensorBoard as well where asked."""
        self.run.append_metrics(record)
        if self.tensorboard is not None:
            self.tensorboard.record(record)

    def _write_grid(self, epoch: int) -> None:
        if not len(self.grid_images):
            return
        model = self.eval_model.eval()
        x = self._batch(
            self.grid_images, torch.arange(len(self.grid_images), device=self.grid_images.device)
        )
        with torch.inference_mode(), self.execution.autocast():
            image = model(x, sample=False).image
        rows = [self.grid_images.cpu(), to_uint8(image, self.config.data.range).cpu()]
        sheet = make_grid(rows)
        self.run.write_grid(epoch, sheet)
        if self.tensorboard is not None:
            self.tensorboard.image("validation", sheet, self.state.step)

    def _write_previews(self, step: int) -> None:
        """samples.png and interpolation.png from the final weights file, as `aecli sample`
        and `aecli interpolate` draw them (no samples where the weights hold no statistics)."""
        from aecli.inference import Predictor
        from aecli.inference.generate import preview_sheets

        predictor = Predictor(self.run.weights, self.device)
        if not predictor.variational and "mean" not in (predictor.info.latent_stats or {}):
            return
        ends = self.grid_images[:2].cpu()
        samples, strip = preview_sheets(predictor, ends, seed=self.config.train.seed)
        save_png(self.run.samples, samples)
        if strip is not None:
            save_png(self.run.interpolation, strip)
        if self.tensorboard is not None:
            self.tensorboard.image("samples", samples, step)
            if strip is not None:
                self.tensorboard.image("interpolation", strip, step)

    def _save_weights(self, record: dict, stats: dict | None = None) -> None:
        metrics = {k: v for k, v in record.items() if k.startswith("val_")}
        metrics.update(epoch=record["epoch"], step=record["step"])
        self.fingerprint = self.run.save_weights(
            self.eval_model,
            self.config,
            preset=self.preset,
            data=self.data_description,
            class_names=self.class_names,
            metrics=metrics,
            latent_stats=stats,
        )

    def _save_checkpoint(self) -> None:
        adversary = self.train_step.adversary
        self.run.save_checkpoint(
            {
                "train_state": asdict(self.state),
                "model": self.model.state_dict(),
                "optimizer": self.train_step.optimizer_state(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "discriminator": adversary and adversary.discriminator.state_dict(),
                "disc_optimizer": adversary and adversary.optimizer.state_dict(),
                "best_weights": self.best_weights,
                "preset": self.preset,
                "data_path": self.data_path,
                "val_data_path": self.val_data_path,
                "data": self.data_record,
            }
        )

    def restore(self, checkpoint: dict, *, data_changed: bool = False) -> None:
        """Continue from a checkpoint: weights, optimiser, EMA, counters; trims metrics.jsonl.
        Data other than the checkpoint's are refused, or with `data_changed` named and
        accepted."""
        self.state = TrainState(**checkpoint["train_state"])
        self._check_data(checkpoint.get("data"), data_changed)
        self.model.load_state_dict(checkpoint["model"])  # copied into the parameters in place
        load_optimizer_state(self.optimizer, checkpoint["optimizer"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        adversary = self.train_step.adversary
        if adversary is not None and checkpoint.get("discriminator") is not None:
            adversary.discriminator.load_state_dict(checkpoint["discriminator"])
            load_optimizer_state(adversary.optimizer, checkpoint["disc_optimizer"])
        self.best_weights = checkpoint.get("best_weights")
        if self.dist.main:
            self.run.trim_history(self.state.epoch, self.state.step)

    def _check_data(self, recorded: dict | None, accepted: bool) -> None:
        """Compare the data with the checkpoint's record of them (a checkpoint written before
        aecli recorded them has none, and resumes as it did)."""
        change = data_change(recorded, self.data_record) if recorded else None
        if change is None:
            return
        where = self.data_description.get("path")
        if not accepted:
            raise DataError(
                f"--resume: the data differ from those the checkpoint trained on ({change}); "
                "restore them, or pass --data-changed to go on with these",
                path=where,
            )
        epoch, batch = self.state.epoch, self.state.batch
        position = (
            f"epoch {epoch} goes on at batch {batch + 1} of an order drawn over these data, so "
            "some of its samples are trained on twice and others not at all"
            if batch
            else f"epoch {epoch} starts on these data"
        )
        validation = (
            "the validation set changed: validation figures before and after are not comparable"
            if recorded.get("validation", {}).get("digest")
            != self.data_record["validation"]["digest"]
            else "the validation set is the same"
        )
        self.reporter.notice(
            f"{where + ': ' if where else ''}the data differ from those the checkpoint trained "
            f"on ({change}); going on (--data-changed): {position}; {validation}"
        )

    # -- Ctrl-C ------------------------------------------------------------------------------

    def _catch_sigint(self):
        """First Ctrl-C: finish the step, save, stop. Later ones (during the save, and while fit
        records the end): ignored."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._stop_requested = True

        return signal.signal(signal.SIGINT, handler)

    def _save_on_interrupt(self) -> None:
        record = {"epoch": self.state.epoch, "step": self.state.step}
        record.update(self._validate())  # on every rank: it ends in a sum over them
        if self.dist.main:
            self._save_checkpoint()
            self._save_weights(record)
        raise Interrupted(
            f"stopped at epoch {self.state.epoch}, step {self.state.step}; checkpoint saved. "
            f"Resume with: aecli train --resume {self.run_dir}"
        )

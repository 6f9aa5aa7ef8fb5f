"""The training engine: the only training loop, for every preset, device and process count.

Data lives as one uint8 tensor (on the GPU when it fits); each step indexes a batch, converts it
to float and augments it on the device. Each step's randomness (augmentation, VAE noise, dropout)
comes from a seed derived from the run's seed and the step number, and each epoch's order from
the seed and the epoch, so a checkpoint needs no RNG state and a resumed run is exact.
Under torchrun each rank trains on its own shard of every epoch's order (DDP); only rank 0
writes files and reports progress.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from aecli.config import Config, config_from_dict, dump_config, parse_yaml, read_yaml_text
from aecli.data import ImageData, split
from aecli.data.transforms import augment, to_uint8, to_unit
from aecli.devices import Execution, deterministic, resolve_device
from aecli.errors import Interrupted, TrainingError, UsageError
from aecli.io.atomic import atomic_write_text, stale_temp_files
from aecli.io.checkpoint import load_checkpoint, save_checkpoint
from aecli.io.images import make_grid, save_png
from aecli.io.weights import save_weights
from aecli.losses import compute_loss, psnr
from aecli.models import Autoencoder, build_model
from aecli.stats import latent_statistics

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"


class Reporter(Protocol):
    """What the engine tells its caller (the CLI renders it with rich)."""

    def start(self, *, epochs: int, steps_per_epoch: int, first_epoch: int) -> None: ...
    def step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None: ...
    def epoch(self, record: dict) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, **_: object) -> None: ...
    def step(self, **_: object) -> None: ...
    def epoch(self, record: dict) -> None: ...
    def finish(self) -> None: ...


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


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for one step (splitmix64 of seed and step)."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def learning_rate(config: Config, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The schedule's learning rate at a step (a pure function: nothing to save on resume)."""
    base, schedule = config.optim.lr, config.optim.schedule
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return base * (step + 1) / schedule.warmup_steps
    if schedule.kind == "cosine":
        span = max(1, total_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        return schedule.min_lr + (base - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule.kind == "step":
        return base * schedule.gamma ** (step // (schedule.step_epochs * steps_per_epoch))
    return base


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on GPUs (`device` is already
    this process's `cuda:LOCAL_RANK`, see resolve_device), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(int(os.environ["RANK"]), world)


class Trainer:
    """Fits one model on one data set and writes (or resumes) the run directory."""

    def __init__(
        self,
        config: Config,
        data: ImageData,
        run_dir: Path,
        *,
        preset: str,
        device: str | None = None,
        reporter: Reporter | None = None,
        data_path: str | None = None,
    ):
        self.config, self.run_dir, self.preset = config, Path(run_dir), preset
        self.device = resolve_device(device)
        self.dist = _setup_distributed(self.device)
        self.reporter = reporter if reporter is not None and self.dist.main else SilentReporter()
        self.data_description, self.data_path = data.source, data_path
        self.class_names = data.class_names
        self.train_data, self.val_data = split(data, config.data.val_fraction, config.train.seed)
        self.state = TrainState()
        self.fingerprint = ""
        self._stop_requested = False

        cuda = self.device.type == "cuda"
        self.execution = Execution(self.device, config.train.precision, config.train.memory_format)

        torch.manual_seed(config.train.seed)
        self.model: Autoencoder = build_model(config).to(
            self.device, memory_format=self.execution.memory_format
        )
        self.ema: Autoencoder | None = None
        if config.train.ema is not None:
            self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.best_weights: dict[str, torch.Tensor] | None = None
        wrapped = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                self.model, device_ids=[self.device] if cuda else None
            )
        self.step_fn = torch.compile(wrapped) if config.train.compile else wrapped
        optim = config.optim
        optimizer_class = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_class(
            self.model.parameters(),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            **({"fused": True} if cuda else {}),
        )
        self.train_images = self._place(self.train_data.images)
        self.val_images = self._place(self.val_data.images)
        self.grid_images = self.val_images[: config.train.grid_images]
        # every rank takes an equal shard of each epoch's order and an equal share of the batch
        n = len(self.train_data) // self.dist.world * self.dist.world
        self.shard_size = n // self.dist.world
        self.rank_batch = max(1, config.train.batch_size // self.dist.world)
        self.steps_per_epoch = math.ceil(self.shard_size / self.rank_batch)

    # -- setup -------------------------------------------------------------------------------

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        """The whole data set on the GPU when it fits in a quarter of free memory; else it stays
        in host memory, and each batch goes through pinned memory (Execution.to_device)."""
        if self.device.type != "cuda":
            return images
        free, _ = torch.cuda.mem_get_info(self.device)
        if images.numel() < free // 4:
            return images.to(self.device)
        return images

    @property
    def eval_model(self) -> Autoencoder:
        """The weights that are validated and exported: the EMA when there is one."""
        return self.ema if self.ema is not None else self.model

    def _batch(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The images at `index` as model input (callers keep `index` on the images' device,
        so that indexing needs no copy)."""
        batch = images[index.to(images.device)]
        return self.execution.prepare(batch, self.config.data.range)

    def _autocast(self):
        return self.execution.autocast()

    # -- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to the configured number of epochs (from where a restored checkpoint stood)."""
        with deterministic(self.config.train.deterministic):
            return self._fit()

    def _fit(self) -> TrainResult:
        train = self.config.train
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "grids").mkdir(exist_ok=True)
            for folder in (self.run_dir, self.run_dir / "grids"):  # left by a killed run
                for leftover in stale_temp_files(folder):
                    leftover.unlink(missing_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            if self.state.step == 0:
                atomic_write_text(self.run_dir / "metrics.jsonl", "")
        history = self._read_history()
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
                self.state.batch, self.state.totals = 0, {}
                if self.dist.main:
                    with (self.run_dir / "metrics.jsonl").open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    self._write_grid(record["epoch"])
                    self._save_weights(record)
                    self._save_checkpoint()
                self.reporter.epoch(record)
        finally:
            self.reporter.finish()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        self._finish(history)
        return TrainResult(
            run_dir=self.run_dir,
            weights=self.run_dir / WEIGHTS,
            epochs=len(history),
            steps=self.state.step,
            seconds=self.state.seconds,
            images_per_s=self.state.images / max(self.state.seconds, 1e-9),
            final=history[-1] if history else {},
            history=history,
            fingerprint=self.fingerprint,
            stopped_early=self.state.stopped_early,
            best_epoch=self.state.best_epoch or None,
        )

    def _train_epoch(self) -> dict:
        config, train, state = self.config, self.config.train, self.state
        self.model.train()
        epoch = state.epoch
        order = torch.randperm(
            len(self.train_data),
            generator=torch.Generator().manual_seed(step_seed(train.seed, -epoch)),
        )
        shard = order[: self.shard_size * self.dist.world][self.dist.rank :: self.dist.world]
        shard = shard.to(self.train_images.device)  # one copy per epoch, none per step
        totals = {
            k: torch.tensor(v, dtype=torch.float64, device=self.device)
            for k, v in state.totals.items()
        }
        window: dict[str, torch.Tensor] = {}
        window_images = 0
        total_steps = train.epochs * self.steps_per_epoch
        # first non-finite step (-1: none yet) and which terms were non-finite then, on the device
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_terms: torch.Tensor | None = None
        started = time.perf_counter()
        images_this_run = 0
        rank_seed = train.seed + 1_000_003 * self.dist.rank
        for i in range(state.batch, self.steps_per_epoch):
            index = shard[i * self.rank_batch : (i + 1) * self.rank_batch]
            torch.manual_seed(step_seed(rank_seed, state.step))
            lr = learning_rate(self.config, state.step, total_steps, self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x = augment(self._batch(self.train_images, index), config.data.augment)
            with self._autocast():
                out = self.step_fn(x, sample=True)
            terms = compute_loss(
                out,
                x,
                config.loss,
                self.model.variational,
                value_range=config.data.range,
                step=state.step,
            )
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            grad_norm = self._grad_norm(config.optim.grad_clip)
            self._note_non_finite(terms, grad_norm, state.step)
            self.optimizer.step()
            if self.ema is not None:
                self._update_ema()
            state.step += 1
            state.batch = i + 1
            weight = len(index)
            for name, value in terms.items():
                value = value.detach().double() * weight
                totals[name] = totals.get(name, 0) + value
                window[name] = window.get(name, 0) + value
            window_images += weight
            images_this_run += weight * self.dist.world
            last = i + 1 == self.steps_per_epoch
            if (i + 1) % train.log_every == 0 or last:
                # the one host sync of the window: progress and the non-finite check
                self._raise_if_non_finite(list(terms))
                means = {k: float(v) / window_images for k, v in window.items()}
                self.reporter.step(epoch=epoch, step=i + 1, metrics=means)
                window, window_images = {}, 0
            if not last and train.checkpoint_every and state.step % train.checkpoint_every == 0:
                self._raise_if_non_finite(list(terms))
                state.totals = {k: float(v) for k, v in totals.items()}
                if self.dist.main:
                    self._save_checkpoint()
            if self._stop_requested:
                state.totals = {k: float(v) for k, v in totals.items()}
                state.seconds += time.perf_counter() - started
                state.images += images_this_run
                self._save_on_interrupt(list(terms))
        seconds = time.perf_counter() - started
        state.seconds += seconds
        state.images += images_this_run
        totals = self._all_reduce(totals)
        n = self.shard_size * self.dist.world
        record = {"epoch": epoch, "step": state.step}
        record.update({k: float(v) / n for k, v in totals.items()})
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["images_per_s"] = round(images_this_run / max(seconds, 1e-9), 1)
        record["seconds"] = round(seconds, 3)
        return record

    def _grad_norm(self, clip: float | None) -> torch.Tensor:
        """The global gradient norm (for the non-finite check), clipping it when asked."""
        if clip is not None:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def _update_ema(self) -> None:
        decay = self.config.train.ema.decay
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, list(self.model.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def _note_non_finite(self, terms: dict, grad_norm: torch.Tensor, step: int) -> None:
        """Record the first non-finite step on the device, without a host sync."""
        values = torch.stack([v.detach().float() for v in terms.values()] + [grad_norm.float()])
        bad = ~torch.isfinite(values)
        first = bad.any() & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_terms = (
            bad if self._bad_terms is None else torch.where(first, bad, self._bad_terms)
        )

    def _raise_if_non_finite(self, names: list[str]) -> None:
        bad_step = int(self._bad_step)
        if self.dist.world > 1:
            flag = torch.tensor([bad_step], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad_step = int(flag)
        if bad_step < 0:
            return
        bad = self._bad_terms.tolist() if self._bad_terms is not None else []
        labels = [*names, "gradient"]
        culprit = next((labels[i] for i, b in enumerate(bad) if b and labels[i] != "loss"), "loss")
        kept = self.run_dir / CHECKPOINT
        where = f"last good checkpoint kept: {kept}" if kept.exists() else "nothing was saved"
        raise TrainingError(
            f"step {bad_step + 1}: {'the ' if culprit == 'gradient' else 'loss term '}"
            f"'{culprit}' became non-finite (NaN or Inf); stopped ({where}). "
            "Try a lower optim.lr or set optim.grad_clip."
        )

    def _all_reduce(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.dist.world > 1:
            for value in totals.values():
                dist.all_reduce(value)
        return totals

    @torch.inference_mode()
    def _validate(self) -> dict:
        config, model = self.config, self.eval_model
        model.eval()
        totals: dict[str, torch.Tensor] = {}
        psnr_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = len(self.val_data)
        mine = torch.arange(self.dist.rank, n, self.dist.world, device=self.val_images.device)
        for start in range(0, len(mine), config.train.batch_size):
            index = mine[start : start + config.train.batch_size]
            x = self._batch(self.val_images, index)
            with self._autocast():
                out = model(x, sample=False)
            terms = compute_loss(
                out, x, config.loss, model.variational, value_range=config.data.range
            )
            for name, value in terms.items():
                totals[name] = totals.get(name, 0) + value.double() * len(index)
            psnr_sum += (
                psnr(to_unit(out.image.float(), config.data.range), to_unit(x, config.data.range))
                .double()
                .sum()
            )
        totals["psnr"] = psnr_sum
        totals = self._all_reduce(totals)
        return {f"val_{k}": float(v) / n for k, v in totals.items()}

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
        stats = latent_statistics(
            self.eval_model,
            self.train_images,
            self.train_data.labels,
            len(self.class_names or []),
            self._batch,
            self.config.train.batch_size,
            self._all_reduce,
            torch.arange(self.dist.rank, len(self.train_data), self.dist.world),
        )
        if self.dist.main and history:
            record = history[-1]
            if rule is not None and rule.restore_best and self.state.best_epoch:
                record = next((r for r in history if r["epoch"] == self.state.best_epoch), record)
            self._save_weights(record, stats)
            # a run killed before this point has trained every epoch but can still be resumed
            # to write these final weights
            self.state.finished = True
            self._save_checkpoint()
        if self.dist.world > 1:
            dist.barrier()

    # -- files -------------------------------------------------------------------------------

    def _write_grid(self, epoch: int) -> None:
        if not len(self.grid_images):
            return
        model = self.eval_model.eval()
        x = self._batch(
            self.grid_images, torch.arange(len(self.grid_images), device=self.grid_images.device)
        )
        with torch.inference_mode(), self._autocast():
            image = model(x, sample=False).image
        rows = [self.grid_images.cpu(), to_uint8(image, self.config.data.range).cpu()]
        save_png(self.run_dir / "grids" / f"epoch-{epoch:04d}.png", make_grid(rows))

    def _save_weights(self, record: dict, stats: dict | None = None) -> None:
        metrics = {k: v for k, v in record.items() if k.startswith("val_")}
        metrics.update(epoch=record["epoch"], step=record["step"])
        try:
            self.fingerprint = save_weights(
                self.run_dir / WEIGHTS,
                self.eval_model,
                self.config,
                preset=self.preset,
                data=self.data_description,
                class_names=self.class_names,
                metrics=metrics,
                latent_stats=stats,
            )
        except ValueError as exc:  # non-finite weights: the previous file stays
            raise TrainingError(f"{exc}; stopped, the last good weights are kept") from None

    def _save_checkpoint(self) -> None:
        state = {
            "train_state": asdict(self.state),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "best_weights": self.best_weights,
            "preset": self.preset,
            "data_path": self.data_path,
        }
        save_checkpoint(self.run_dir / CHECKPOINT, state)

    def _read_history(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if self.state.step == 0 or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def restore(self, checkpoint: dict) -> None:
        """Continue from a checkpoint: weights, optimiser, EMA, counters; trims metrics.jsonl."""
        self.state = TrainState(**checkpoint["train_state"])
        self.model.load_state_dict(checkpoint["model"])  # copied into the parameters in place
        _load_optimizer_state(self.optimizer, checkpoint["optimizer"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        self.best_weights = checkpoint.get("best_weights")
        path = self.run_dir / "metrics.jsonl"
        if self.dist.main and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] < self.state.epoch
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    # -- Ctrl-C ------------------------------------------------------------------------------

    def _catch_sigint(self):
        """First Ctrl-C: finish the step, save, stop. Later ones (during the save): ignored."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._stop_requested = True

        return signal.signal(signal.SIGINT, handler)

    def _save_on_interrupt(self, names: list[str]) -> None:
        self._raise_if_non_finite(names)
        if self.dist.main:
            self._save_checkpoint()
            record = {"epoch": self.state.epoch, "step": self.state.step}
            record.update(self._validate())
            self._save_weights(record)
        raise Interrupted(
            f"stopped at epoch {self.state.epoch}, step {self.state.step}; checkpoint saved. "
            f"Resume with: aecli train --resume {self.run_dir}"
        )


# How the optimiser runs on this device, not what it has learnt: kept from the optimiser that
# resumes, not taken from the checkpoint (a CPU checkpoint must not turn fused Adam off on CUDA).
_IMPLEMENTATION = ("fused", "foreach", "capturable")


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimiser state so that it fits this run's parameters, wherever it was saved.

    `load_state_dict` moves state to the parameters' device but keeps the strides it was stored
    with, and a checkpoint stores contiguous tensors: a channels-last parameter would get a
    contiguous exp_avg, which fused Adam refuses. So every per-parameter tensor is re-laid out
    like its parameter, and the step counter goes where the implementation wants it (on the
    parameter's device for fused or capturable Adam, on the CPU otherwise)."""
    implementation = [
        {k: group[k] for k in _IMPLEMENTATION if k in group} for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(saved)
    for group, flags in zip(optimizer.param_groups, implementation, strict=True):
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    state[key] = value.to(param.device if on_device else "cpu", torch.float32)
                elif value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def train(config: Config, data: ImageData, run_dir: Path, **options) -> TrainResult:
    """Train a model on `data` and write the run directory (DESIGN section 4).

    `options` are Trainer's keywords: preset (required), device, reporter, data_path.
    """
    return Trainer(config, data, run_dir, **options).fit()


@dataclass
class ResumePlan:
    """What `--resume DIR` continues: the run's config, preset name and data path."""

    config: Config
    preset: str
    data_path: str | None
    checkpoint: dict


def plan_resume(run_dir: Path, epochs: int | None = None) -> ResumePlan:
    """Read a run directory's config and checkpoint; `epochs` sets a new total."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UsageError("--resume: not a run directory (no config.yaml)", path=run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    raw = parse_yaml(read_yaml_text(config_path), str(config_path))
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise UsageError("--resume: damaged config.yaml (not a preset)", path=config_path)
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    config = config_from_dict(raw, str(config_path))
    state = checkpoint["train_state"]
    done = state["epoch"] - 1
    # all epochs trained (or stopped early) and the final weights written; a checkpoint from an
    # aecli that did not record `finished` counts as finished then, as it always did
    all_trained = state["stopped_early"] or (done >= config.train.epochs and state["batch"] == 0)
    if all_trained and state.get("finished", True):
        raise UsageError(
            f"--resume: this run already finished {done} epochs; pass --epochs N "
            "with a larger total to train on",
            path=run_dir,
        )
    return ResumePlan(config, checkpoint["preset"], checkpoint["data_path"], checkpoint)


def resume(plan: ResumePlan, data: ImageData, run_dir: Path, **options) -> TrainResult:
    """Continue a planned run (options: device, reporter)."""
    trainer = Trainer(
        plan.config, data, run_dir, preset=plan.preset, data_path=plan.data_path, **options
    )
    trainer.restore(plan.checkpoint)
    return trainer.fit()

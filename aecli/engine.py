"""The training engine: the only training loop, for every preset and device.

Data lives as one uint8 tensor (on the GPU when it fits); each step indexes a batch, converts
it to float and augments it on the device. Each step's randomness (augmentation, VAE noise,
dropout) comes from a seed derived from the run's seed and the step number.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from aecli.config import Config, dump_config
from aecli.data import ImageData, split
from aecli.data.transforms import augment, to_model_range, to_uint8, to_unit
from aecli.errors import TrainingError, UsageError
from aecli.io.atomic import atomic_write_text
from aecli.io.images import make_grid, save_png
from aecli.io.weights import save_weights
from aecli.losses import compute_loss, psnr
from aecli.models import Autoencoder, build_model


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


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) picks CUDA when present; an explicit device must exist."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: aecli trains on cpu or cuda")
    return device


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for one step (splitmix64 of seed and step)."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class Trainer:
    """Fits one model on one data set and writes the run directory."""

    def __init__(
        self,
        config: Config,
        data: ImageData,
        run_dir: Path,
        *,
        preset: str,
        device: str | None = None,
        reporter: Reporter | None = None,
    ):
        self.config, self.run_dir, self.preset = config, Path(run_dir), preset
        self.device = resolve_device(device)
        self.reporter = reporter or SilentReporter()
        self.data_description = data.source
        self.class_names = data.class_names
        self.train_data, self.val_data = split(data, config.data.val_fraction, config.train.seed)

        cuda = self.device.type == "cuda"
        precision = config.train.precision
        self.autocast_dtype = (
            torch.bfloat16 if precision == "bf16" or (precision == "auto" and cuda) else None
        )
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format

        torch.manual_seed(config.train.seed)
        self.model: Autoencoder = build_model(config).to(
            self.device, memory_format=self.memory_format
        )
        self.step_fn = torch.compile(self.model) if config.train.compile else self.model
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
        self.step = 0

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        """The whole data set on the GPU when it fits in a quarter of free memory; else pinned."""
        if self.device.type != "cuda":
            return images
        free, _ = torch.cuda.mem_get_info(self.device)
        if images.numel() < free // 4:
            return images.to(self.device)
        return images.pin_memory()

    def _batch(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if images.device != self.device:
            batch = images[index].pin_memory().to(self.device, non_blocking=True)
        else:
            batch = images[index.to(self.device)]
        x = to_model_range(batch, self.config.data.range)
        return x.contiguous(memory_format=self.memory_format)

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def fit(self) -> TrainResult:
        config, train = self.config, self.config.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "grids").mkdir(exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump_config(config))
        metrics_path = self.run_dir / "metrics.jsonl"
        metrics_path.write_text("")

        n = len(self.train_data)
        steps_per_epoch = math.ceil(n / train.batch_size)
        self.reporter.start(epochs=train.epochs, steps_per_epoch=steps_per_epoch, first_epoch=1)
        history: list[dict] = []
        started = time.perf_counter()
        images_seen = 0
        for epoch in range(1, train.epochs + 1):
            record = self._train_epoch(epoch, steps_per_epoch)
            images_seen += n
            record.update(self._validate(epoch))
            history.append(record)
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self._save_weights(record)
            self.reporter.epoch(record)
        seconds = time.perf_counter() - started
        self.reporter.finish()
        final = history[-1]
        return TrainResult(
            run_dir=self.run_dir,
            weights=self.run_dir / "model.safetensors",
            epochs=train.epochs,
            steps=self.step,
            seconds=seconds,
            images_per_s=images_seen / seconds,
            final=final,
            history=history,
            fingerprint=self.fingerprint,
        )

    def _train_epoch(self, epoch: int, steps_per_epoch: int) -> dict:
        config, train = self.config, self.config.train
        self.model.train()
        n = len(self.train_data)
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(step_seed(train.seed, -epoch))
        )
        totals: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        started = time.perf_counter()
        for i in range(steps_per_epoch):
            index = order[i * train.batch_size : (i + 1) * train.batch_size]
            torch.manual_seed(step_seed(train.seed, self.step))
            x = augment(self._batch(self.train_images, index), config.data.augment)
            with self._autocast():
                out = self.step_fn(x, sample=True)
            terms = compute_loss(out, x, config.loss, self.model.variational)
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            self.optimizer.step()
            self.step += 1
            weight = len(index)
            for name, value in terms.items():
                value = value.detach() * weight
                totals[name] = totals.get(name, 0) + value
                window[name] = window.get(name, 0) + value
            window_steps += weight
            if (i + 1) % train.log_every == 0 or i + 1 == steps_per_epoch:
                # the one host sync of the window: progress display and the non-finite check
                means = {k: float(v) / window_steps for k, v in window.items()}
                self._check_finite(means)
                self.reporter.step(epoch=epoch, step=i + 1, metrics=means)
                window, window_steps = {}, 0
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "step": self.step}
        record.update({k: float(v) / n for k, v in totals.items()})
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["images_per_s"] = round(n / seconds, 1)
        record["seconds"] = round(seconds, 3)
        return record

    def _check_finite(self, means: dict[str, float]) -> None:
        bad = [k for k, v in means.items() if not math.isfinite(v) and k != "loss"]
        if bad or not math.isfinite(means["loss"]):
            term = bad[0] if bad else "loss"
            raise TrainingError(
                f"loss term '{term}' became {means.get(term)} near step {self.step}; "
                "stopped (try a lower optim.lr)"
            )

    @torch.inference_mode()
    def _validate(self, epoch: int) -> dict:
        config = self.config
        self.model.eval()
        totals: dict[str, torch.Tensor] = {}
        psnr_sum = torch.zeros((), device=self.device)
        n = len(self.val_data)
        batch = config.train.batch_size
        for start in range(0, n, batch):
            index = torch.arange(start, min(start + batch, n))
            x = self._batch(self.val_images, index)
            with self._autocast():
                out = self.model(x, sample=False)
            terms = compute_loss(out, x, config.loss, self.model.variational)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0) + value.float() * len(index)
            psnr_sum += psnr(
                to_unit(out.image.float(), config.data.range), to_unit(x, config.data.range)
            ).sum()
        record = {f"val_{k}": float(v) / n for k, v in totals.items()}
        record["val_psnr"] = float(psnr_sum) / n
        if len(self.grid_images):
            self._write_grid(epoch)
        return record

    def _write_grid(self, epoch: int) -> None:
        value_range = self.config.data.range
        x = self._batch(self.grid_images, torch.arange(len(self.grid_images)))
        with self._autocast():
            image = self.model(x, sample=False).image
        rows = [self.grid_images.cpu(), to_uint8(image, value_range).cpu()]
        save_png(self.run_dir / "grids" / f"epoch-{epoch:04d}.png", make_grid(rows))

    def _save_weights(self, record: dict) -> None:
        metrics = {k: v for k, v in record.items() if k.startswith("val_")}
        metrics.update(epoch=record["epoch"], step=record["step"])
        self.fingerprint = save_weights(
            self.run_dir / "model.safetensors",
            self.model,
            self.config,
            preset=self.preset,
            data=self.data_description,
            class_names=self.class_names,
            metrics=metrics,
        )


def train(
    config: Config,
    data: ImageData,
    run_dir: Path,
    *,
    preset: str,
    device: str | None = None,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train a model on `data` and write the run directory (DESIGN section 4)."""
    return Trainer(config, data, run_dir, preset=preset, device=device, reporter=reporter).fit()

"""One training step: forward, loss, backward, gradient norms, optimiser, EMA.

The step does all its work on the device and never waits for it: what the loop needs to know
(each loss term and the gradient norms, to report progress and to stop on a non-finite value)
comes back as one small tensor that the loop reads once per logging window.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from aecli.config import Config
from aecli.data.transforms import augment
from aecli.devices import Execution
from aecli.engine.adversary import Adversary
from aecli.errors import UsageError
from aecli.losses import compute_loss, reconstruction_part
from aecli.models import Autoencoder


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


def uses_randomness(config: Config, model: nn.Module) -> bool:
    """Whether a step draws random numbers: augmentation, a VAE's sampling, dropout."""
    augmented = config.data.augment.hflip or config.data.augment.crop_scale is not None
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    return augmented or config.model.latent.variational or dropout


class TrainStep:
    """The model, its optimiser and EMA, and the work of one step on a prepared batch.

    Each step's randomness comes from a seed derived from the run's seed (per rank) and the
    step number, so that a resumed run draws what the uninterrupted one drew; a step that draws
    nothing skips the seeding.
    """

    def __init__(
        self,
        config: Config,
        model: Autoencoder,
        execution: Execution,
        *,
        rank: int = 0,
        world: int = 1,
    ):
        self.config, self.model, self.execution = config, model, execution
        freeze = config.train.freeze
        if freeze != "none":
            frozen = [model.decoder] if freeze == "decoder" else [model.encoder, model.latent_head]
            for part in frozen:
                part.requires_grad_(False)
        self.ema: Autoencoder | None = None
        if config.train.ema is not None:
            self.ema = copy.deepcopy(model).requires_grad_(False)
        forward: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = execution.device.type == "cuda"
            forward = DistributedDataParallel(
                model, device_ids=[execution.device] if cuda else None
            )
        self.forward = torch.compile(forward) if config.train.compile else forward
        optim = config.optim
        optimizer_class = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer_class(
            self.params,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            **({"fused": True} if execution.device.type == "cuda" else {}),
        )
        self.seed = config.train.seed + 1_000_003 * rank
        self.random = uses_randomness(config, model)
        if self.ema is not None:  # the lists foreach operations take, built once
            self.ema_params = list(self.ema.parameters())
            self.model_params = list(model.parameters())
            self.ema_buffers, self.model_buffers = list(self.ema.buffers()), list(model.buffers())
        self.perceptual = None  # LPIPS, when loss.perceptual_weight is set
        if config.loss.perceptual_weight > 0:
            from aecli.perceptual import load_lpips

            self.perceptual = load_lpips(execution.device)
        self.adversary = None
        if config.loss.disc_weight > 0:
            if world > 1:
                raise UsageError(
                    "loss.disc_weight: the discriminator trains in a single process for now; "
                    "run without torchrun"
                )
            self.adversary = Adversary(config, model, execution)
        self.names: list[str] = []  # what each value of a step's result is
        self._lr: float | None = None

    def __call__(self, x: torch.Tensor, step: int, lr: float) -> torch.Tensor:
        """Train on one batch (model-range floats on the device) at optimiser step `step`.
        Returns each loss term, then the gradient norm(s), as one float tensor on the device."""
        config = self.config
        if self.random:
            torch.manual_seed(step_seed(self.seed, step))
        if lr != self._lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.adversary is not None:
                self.adversary.set_lr(lr)
            self._lr = lr
        x = augment(x, config.data.augment)
        with self.execution.autocast():
            out = self.forward(x, sample=True)
        terms = compute_loss(
            out,
            x,
            config.loss,
            self.model.variational,
            value_range=config.data.range,
            step=step,
            perceptual=self.perceptual,
        )
        adversary = self.adversary
        if adversary is not None:
            nll = reconstruction_part(terms, config.loss, x)
            generator = adversary.generator_terms(out.image, nll, step)
            terms["loss"] = terms["loss"] + generator["disc_weight"] * generator["g_loss"]
            terms.update(generator)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        with torch.no_grad():
            norms = self._grad_norms()
        self.optimizer.step()
        if adversary is not None:
            terms.update(adversary.train(x, out.image, step))
        with torch.no_grad():
            values = torch.stack([*terms.values(), *norms])
        if self.ema is not None:
            self._update_ema()
        if not self.names:
            self.names = [*terms, *["gradient"] * len(norms)]
        return values

    def _grad_norms(self) -> list[torch.Tensor]:
        """The global gradient norm when clipping to it, else each gradient's norm (one fused
        operation; a non-finite gradient shows in its own norm, all the check needs)."""
        clip = self.config.optim.grad_clip
        if clip is not None:
            return [torch.nn.utils.clip_grad_norm_(self.params, clip)]
        return list(torch._foreach_norm([p.grad for p in self.params if p.grad is not None]))

    def _update_ema(self) -> None:
        decay = self.config.train.ema.decay
        torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - decay)
        if self.ema_buffers:
            torch._foreach_copy_(self.ema_buffers, self.model_buffers)


# How the optimiser runs on this device, not what it has learnt: kept from the optimiser that
# resumes, not taken from the checkpoint (a CPU checkpoint must not turn fused Adam off on CUDA).
_IMPLEMENTATION = ("fused", "foreach", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
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

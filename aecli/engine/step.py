"""One training step: forward, loss, backward, gradient norms, optimiser, EMA.

The step does all its work on the device and never waits for it: what the loop needs to know
(each loss term and the gradient norms, to report progress and to stop on a non-finite value)
comes back as one small tensor that the loop reads once per logging window.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from aecli.config import Config
from aecli.data.dataset import step_seed
from aecli.data.transforms import augment
from aecli.devices import Execution
from aecli.engine.adversary import Adversary
from aecli.errors import UsageError, first_line
from aecli.losses import compute_loss, reconstruction_part
from aecli.models import Autoencoder


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
        batch_size: int | None = None,
        notice: Callable[[str], None] = lambda _: None,
    ):
        self.config, self.model, self.execution = config, model, execution
        obstacle = graph_obstacle(config, execution, world) if config.train.cuda_graph else None
        if obstacle:
            notice(f"train.cuda_graph: {obstacle}; every step runs eagerly")
        graphed = config.train.cuda_graph and obstacle is None
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
        device_options = execution.optimizer_options()
        if graphed:  # the graph reads the learning rate from a tensor the loop fills
            device_options["capturable"] = True
        self.optimizer = optimizer_class(
            self.params,
            lr=torch.tensor(optim.lr, device=execution.device) if graphed else optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            **device_options,
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
        self.graph: CapturedStep | None = None
        if graphed:
            self.graph = CapturedStep(
                self._work,
                batch_size or config.train.batch_size,
                first_step=config.loss.kl_warmup_steps,  # the KL weight is constant from here
                notice=notice,
                before_capture=lambda: self.optimizer.zero_grad(set_to_none=True),
            )

    @property
    def lr(self) -> float:
        """The learning rate of the last step (the optimiser's before any)."""
        return self._lr if self._lr is not None else float(self.optimizer.param_groups[0]["lr"])

    def __call__(self, x: torch.Tensor, step: int, lr: float) -> torch.Tensor:
        """Train on one batch (model-range floats on the device) at optimiser step `step`.
        Returns each loss term, then the gradient norm(s), as one float tensor on the device."""
        if self.random:
            torch.manual_seed(step_seed(self.seed, step))
        if lr != self._lr:
            for group in self.optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)  # in place: a captured graph reads this tensor
                else:
                    group["lr"] = lr
            if self.adversary is not None:
                self.adversary.set_lr(lr)
            self._lr = lr
        if self.graph is not None:
            return self.graph(x, step)
        return self._work(x, step)

    def _work(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The step's device work: no host synchronisation, so that it can be captured."""
        config = self.config
        x = augment(x, config.data.augment)
        with self.execution.autocast(cache=self.graph is None):
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

    def optimizer_state(self) -> dict:
        """The optimiser's state dict for a checkpoint, with plain-number learning rates."""
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])
        return state

    def _grad_norms(self) -> list[torch.Tensor]:
        """The global gradient norm when clipping to it, else each gradient's norm (one fused
        operation; a non-finite gradient shows in its own norm, all the check needs)."""
        clip = self.config.optim.grad_clip
        if clip is not None:
            return [torch.nn.utils.clip_grad_norm_(self.params, clip)]
        return list(torch._foreach_norm([p.grad for p in self.params if p.grad is not None]))

    @torch.no_grad()
    def _update_ema(self) -> None:
        # without no_grad the in-place lerp records autograd history: every EMA tensor would
        # chain one node per step and keep the parameters' gradient accumulators alive (memory
        # growing with the run; on CUDA a graph capture then fails in backward)
        decay = self.config.train.ema.decay
        torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - decay)
        if self.ema_buffers:
            torch._foreach_copy_(self.ema_buffers, self.model_buffers)


def deterministic_obstacle(config: Config) -> str | None:
    """The first block or loss of a config that trains with an operation PyTorch has no
    deterministic CUDA kernel for (the backward of bilinear and bicubic interpolation, and of
    torchmetrics' reflection padding in MS-SSIM), or None."""
    for part in ("encoder", "decoder"):
        for i, spec in enumerate(getattr(config.model, part)):
            if spec.type in ("resize", "upsample") and spec.mode in ("bilinear", "bicubic"):
                return f"model.{part}[{i}] ({spec.type}, {spec.mode} interpolation)"
    if config.loss.ms_ssim_weight:
        return "loss.ms_ssim_weight (MS-SSIM's reflection padding)"
    return None


def graph_obstacle(config: Config, execution: Execution, world: int) -> str | None:
    """Why the step cannot run as a CUDA graph here, or None where it can."""
    if execution.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if world > 1:
        return "not under torchrun (DDP synchronises gradients outside the graph)"
    if config.train.compile:
        return "not with train.compile"
    if config.loss.disc_weight > 0:
        return "not with the discriminator (loss.disc_weight)"
    if config.loss.ms_ssim_weight:
        # torchmetrics builds a GPU tensor from a Python list every call: a host copy
        return "not with MS-SSIM (loss.ms_ssim_weight: torchmetrics' copies from the host)"
    return None


class CapturedStep:
    """A step's device work recorded once as a CUDA graph and replayed for every batch of the full
    batch size (train.cuda_graph): one launch instead of hundreds.

    The first WARMUP steps of that size run eagerly on a side stream (cuDNN autotunes, the
    optimiser creates its state), as PyTorch's whole-network capture prescribes; the next one is
    captured on the same stream and replayed. Later steps copy their batch into the graph's
    static input and replay it. Other steps run eagerly: a smaller last batch, steps before
    `first_step` (the KL warm-up, whose weight changes every step), and every step after a
    capture that failed (one notice). Replay takes the CUDA generator's seed at launch, so the
    loop's per-step seeding draws what an eager step would. The learning rate is a tensor the
    optimiser reads inside the graph (TrainStep fills it in place).
    """

    WARMUP = 3

    def __init__(
        self,
        work: Callable[[torch.Tensor, int], torch.Tensor],
        batch_size: int,
        *,
        first_step: int = 0,
        notice: Callable[[str], None] = lambda _: None,
        before_capture: Callable[[], None] = lambda: None,
    ):
        self.work, self.batch_size, self.first_step = work, batch_size, first_step
        self.notice, self.before_capture = notice, before_capture
        self.warm = 0
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture run on it
        self.failed = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_result: torch.Tensor | None = None
        self.replays = 0

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.graph is not None and self._fits(x):
            self.static_x.copy_(x)
            self.graph.replay()
            self.replays += 1
            return self.static_result.clone()  # the next replay overwrites it
        with warnings.catch_warnings():
            # capturable Adam warns when it steps outside a capture: here that is the plan
            warnings.filterwarnings("ignore", "This instance was constructed with capturable")
            return self._unreplayed(x, step)

    def _unreplayed(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """An eager step, a warm-up step or the capture."""
        eager = self.failed or self.graph is not None  # after the capture: another layout
        if eager or len(x) != self.batch_size or step < self.first_step:
            return self.work(x, step)
        with torch.cuda.device(x.device):  # the device whose generator the graph uses
            if self.stream is None:
                self.stream = torch.cuda.Stream(x.device)
            if self.warm < self.WARMUP:
                self.warm += 1
                self.stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(self.stream):
                    result = self.work(x, step)
                torch.cuda.current_stream(x.device).wait_stream(self.stream)
                return result
            return self._capture(x, step)

    def _fits(self, x: torch.Tensor) -> bool:
        return x.shape == self.static_x.shape and x.stride() == self.static_x.stride()

    def _capture(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Record this step (capture runs nothing), then replay it to train on it."""
        self.static_x = x.clone()
        self.before_capture()  # gradients from the graph's own memory, overwritten by replays
        graph = torch.cuda.CUDAGraph()
        try:
            # on the warm-up's stream, whose library handles and workspaces are set up already
            self.static_result = capture(graph, self.stream, lambda: self.work(self.static_x, step))
        except RuntimeError as exc:  # an operation that cannot be captured
            self.failed = True
            self.static_x = self.static_result = None
            self.notice(
                f"train.cuda_graph: the step could not be captured ({first_line(exc)}); "
                "every step runs eagerly"
            )
            self.before_capture()
            reset_generator(x.device)
            return self.work(x, step)
        self.graph = graph
        graph.replay()
        self.replays += 1
        return self.static_result.clone()


def capture(
    graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, work: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`work()` recorded into `graph` on `stream`, as `torch.cuda.graph` records it, but leaving
    the stream and the allocator's capture however the capture ends. (torch.cuda.graph's exit
    raises from `capture_end` before it restores the current stream, so a failed capture left
    the eager fallback training on the side stream, with an allocator that defers every free
    while it believes a capture is under way.)"""
    torch.cuda.synchronize(stream.device)
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            result = work()
            graph.capture_end()
        except BaseException:
            abandon_capture(graph, stream.device)
            raise
    return result


def abandon_capture(graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    """End a capture that failed, wherever it failed: the stream's capture mode, the allocator's
    private pool for it (each step is allowed to fail: it may have happened already)."""
    with contextlib.suppress(RuntimeError):
        graph.capture_end()
    with contextlib.suppress(RuntimeError, AttributeError):
        torch._C._cuda_endAllocateToPool(device.index, graph.pool())
    with contextlib.suppress(RuntimeError):
        graph.reset()


def reset_generator(device: torch.device) -> None:
    """Give the device's default CUDA generator a fresh state with the same seed. A capture that
    fails can leave the generator in capture mode, and every later random draw on the device
    would then fail ("Offset increment outside graph capture"), in this run and the process's
    next ones. The loop reseeds every step, so the offset it loses does not matter."""
    generator = torch.cuda.default_generators[device.index]
    seed = generator.initial_seed()
    try:
        generator.graphsafe_set_state(torch.Generator(device).graphsafe_get_state())
    except (AttributeError, RuntimeError):  # a torch without graph-safe generator states
        return
    generator.manual_seed(seed)


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
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, flags, rate in zip(optimizer.param_groups, implementation, rates, strict=True):
        group.update(flags)
        saved_rate = float(group["lr"])
        # a tensor learning rate (read by a captured graph) stays that tensor, refilled
        group["lr"] = rate.fill_(saved_rate) if isinstance(rate, torch.Tensor) else saved_rate
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

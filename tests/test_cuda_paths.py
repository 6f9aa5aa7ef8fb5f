"""The CUDA-only branches, run on the CPU: with a `torch.device("cuda", 0)` that nothing touches,
stand-ins for the `torch.cuda` functions a branch calls, bf16 tensors on the CPU, and the gloo
torchrun test. What only a GPU can check is listed in the README's testing section.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import TINY, train_weights, write_image
from test_devices import pretend_torchrun

import aecli.devices
import aecli.engine.step as step_module
import aecli.engine.trainer
import aecli.inference.predictor
from aecli.config import load_config
from aecli.devices import (
    NOT_DETERMINISTIC,
    Execution,
    ModelCost,
    available_memory,
    deterministic,
)
from aecli.distributed import setup_distributed
from aecli.engine.step import CapturedStep, deterministic_obstacle, graph_obstacle
from aecli.errors import UsageError
from aecli.io.checkpoint import load_checkpoint
from aecli.losses import compute_loss, reflect_pad
from aecli.models.autoencoder import AutoencoderOutput, DiagonalGaussian
from aecli.run.training import trainer_in

CUDA0 = torch.device("cuda", 0)
BIG = ModelCost(forward_flops=10**12, group_norm=False)  # bf16 territory on CUDA


# -- 1. a device is resolved once -------------------------------------------------------------


@pytest.fixture
def resolved_once(monkeypatch):
    """resolve_device as under torchrun, where resolving `cuda:N` a second time is refused:
    every call after the first fails. Returns the names it was called with."""
    real = aecli.devices.resolve_device
    calls: list = []

    def once(name):
        calls.append(name)
        if len(calls) > 1:
            raise UsageError(f"--device {name}: resolved a second time")
        return real(name)

    for module in [m for name, m in sys.modules.items() if name.startswith("aecli")]:
        if getattr(module, "resolve_device", None) is real:
            monkeypatch.setattr(module, "resolve_device", once)
    return calls


def test_training_resolves_its_device_once(resolved_once, tiny_preset, tmp_path, cli):
    """The previews at the end of a run (samples, interpolation) used to resolve the trainer's
    device again from its name: under torchrun that refused `cuda:N` and failed every run."""
    run = tmp_path / "run"
    ran = cli("train", tiny_preset, "--out", run, "--epochs", "1", "--device", "cpu")
    assert ran.exit_code == 0, ran.output
    assert resolved_once == ["cpu"]
    assert json.loads((run / "state.json").read_text())["state"] == "finished"
    assert (run / "samples.png").is_file() and (run / "interpolation.png").is_file()


def test_commands_resolve_their_device_once(resolved_once, tiny_weights, other_weights, tmp_path):
    from typer.testing import CliRunner

    from aecli.cli import app

    write_image(tmp_path / "in" / "a.png")
    ran = CliRunner().invoke(
        app,
        ["diff", str(tiny_weights), str(tmp_path / "in"), "--vs", str(other_weights)]
        + ["-o", str(tmp_path / "d.png"), "--device", "cpu"],
    )
    assert ran.exit_code == 0, ran.output
    assert resolved_once == ["cpu"]


def test_an_indexed_device_passes_on_under_torchrun(monkeypatch):
    """Under torchrun `resolve_device("cuda:1")` is refused; the resolved device itself, passed
    on, is taken as it is."""
    pretend_torchrun(monkeypatch, gpus=2)
    device = aecli.devices.resolve_device("cuda")
    assert str(device) == "cuda:1"
    assert aecli.devices.resolved(device) is device
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        aecli.devices.resolved("cuda:1")


# -- 2. the posterior and the losses in fp32 under bf16 ----------------------------------------


def test_kl_and_losses_are_fp32_whatever_the_encoder_ran_in():
    """A bf16 encoder output near the prior: the KL and its gradient as their fp64 formulas
    give them (in bf16 the KL came out 0.535 instead of 1.217, and its gradient vanished for
    |logvar| < 2^-8)."""
    generator = torch.Generator().manual_seed(0)
    mean = (0.05 * torch.randn(8, 16, generator=generator)).bfloat16()
    logvar = (0.003 * torch.randn(8, 16, generator=generator)).bfloat16().requires_grad_()
    kl = DiagonalGaussian(mean, logvar).kl()
    m, v = mean.double(), logvar.detach().double()
    expected = 0.5 * (m.pow(2) + v.exp() - 1 - v).sum(1)
    assert kl.dtype == torch.float32
    assert torch.allclose(kl.double(), expected, rtol=1e-4, atol=0)
    kl.sum().backward()
    expected_grad = 0.5 * (v.exp() - 1)
    assert torch.allclose(logvar.grad.double(), expected_grad, rtol=0.02, atol=1e-7)
    assert (logvar.grad != 0).all()

    # every loss term of a bf16 forward pass, against its fp64 formula
    config = load_config(
        "fashion-vae", ["loss.reconstruction=mse", "loss.reduction=mean", "loss.ssim_weight=0.5"]
    ).config.loss
    target = torch.rand(8, 1, 16, 16, generator=generator)
    raw = torch.randn(8, 1, 16, 16, generator=generator).bfloat16()
    image = torch.sigmoid(raw)
    posterior = DiagonalGaussian(mean, logvar.detach())
    out = AutoencoderOutput(posterior, posterior.mean, raw, image)
    terms = compute_loss(out, target, config, True)
    assert all(t.dtype == torch.float32 for t in terms.values()), {
        k: t.dtype for k, t in terms.items()
    }
    assert terms["kl"].double() == pytest.approx(float(expected.mean()), rel=1e-4)
    mse = (image.double() - target.double()).pow(2).mean()
    assert terms["mse"].double() == pytest.approx(float(mse), rel=1e-6)
    total = terms["mse"] + config.kl_weight * terms["kl"] + 0.5 * terms["ssim"]
    assert terms["loss"] == pytest.approx(float(total), rel=1e-6)


# -- 3. train.deterministic means what it says -------------------------------------------------


def test_deterministic_mode_raises_instead_of_warning():
    """Inside `deterministic(True)` an operation without a deterministic kernel raises (this
    one has none on the CPU either); attention keeps to the math backend; all is restored."""
    before = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        with pytest.raises(RuntimeError, match=NOT_DETERMINISTIC):
            torch.zeros(4).put_(torch.tensor([1]), torch.tensor([1.0]))
    assert not torch.are_deterministic_algorithms_enabled()
    after = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()
    assert after == before


def test_deterministic_training_names_what_has_no_deterministic_kernel(tiny_preset, tmp_path):
    # known before training: mnist-cae's bilinear resize, MS-SSIM's reflection padding
    mnist = load_config("mnist-cae", ["train.deterministic=true"]).config
    assert deterministic_obstacle(mnist) == "model.decoder[6] (resize, bilinear interpolation)"
    assert deterministic_obstacle(load_config("cifar-cae").config) is None
    with_ms_ssim = load_config("cifar-cae", ["loss.ms_ssim_weight=0.1"]).config
    assert "loss.ms_ssim_weight" in deterministic_obstacle(with_ms_ssim)
    from aecli.data import load_data

    data = load_data(None, load_config(str(tiny_preset)).config.data, 0)
    with pytest.raises(UsageError) as caught:
        trainer_in(mnist, data, tmp_path / "refused", preset="mnist-cae", device=CUDA0)
    message = str(caught.value)
    assert "train.deterministic: model.decoder[6] (resize, bilinear interpolation)" in message
    assert "\n" not in message and not (tmp_path / "refused").exists()

    # found while training: PyTorch's own error becomes one line naming the operation
    config = load_config(str(tiny_preset), ["train.deterministic=true"]).config
    trainer = trainer_in(config, data, tmp_path / "run", preset="tiny", device="cpu")
    trainer.model.encoder.register_forward_hook(
        lambda *_: torch.zeros(2).put_(torch.tensor([0]), torch.tensor([1.0]))
    )
    with pytest.raises(UsageError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert message.startswith("train.deterministic: PyTorch has no deterministic kernel for ")
    assert "put_" in message and "\n" not in message
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["state"] == "failed" and "train.deterministic" in state["reason"]


def test_ssim_padding_is_reflection_with_a_deterministic_backward():
    """SSIM pads by gathering (deterministic backward on CUDA): the values and gradients of
    reflection padding (replication where a side is too short to reflect)."""
    for shape in [(2, 3, 16, 12), (1, 1, 6, 9), (1, 2, 5, 20)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        mode = "reflect" if min(shape[-2:]) > 5 else "replicate"
        weights = torch.randn(reflect_pad(x, 5).shape, dtype=torch.float64)
        mine = torch.autograd.grad((reflect_pad(x, 5) * weights).sum(), x)[0]
        padded = torch.nn.functional.pad(x, (5,) * 4, mode=mode)
        theirs = torch.autograd.grad((padded * weights).sum(), x)[0]
        assert torch.equal(reflect_pad(x, 5), padded)
        assert torch.allclose(mine, theirs)


# -- 4. the step as a CUDA graph, with stand-ins for torch.cuda ---------------------------------


class StandInCuda:
    """Stand-ins for what CapturedStep calls in torch.cuda, on CPU tensors. A 'graph' records
    nothing: its replay runs the step's work again on the static input, which on the CPU is
    what a replay of the captured kernels computes; the work the capture itself ran is undone,
    since a real capture runs nothing. `fail_capture` makes capture_end fail as an invalidated
    capture does."""

    def __init__(self, monkeypatch, captured: dict):
        self.events: list[str] = []
        self.streams: list[str] = []  # the current stream stack
        self.fail_capture = False
        stand_in = self

        class Stream:
            def __init__(self, device=None):
                self.device = torch.device("cpu")

            def wait_stream(self, other):
                stand_in.events.append("wait")

        class StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                stand_in.streams.append("side")

            def __exit__(self, *exc):
                stand_in.streams.pop()

        class Graph:
            def capture_begin(self, *args, **kwargs):
                stand_in.events.append("capture_begin")
                self.saved = captured["save"]()

            def capture_end(self):
                stand_in.events.append("capture_end")
                captured["restore"](self.saved)  # a capture records the work, runs none of it
                if stand_in.fail_capture:
                    raise RuntimeError("CUDA error: operation failed due to a previous error")

            def replay(self):
                stand_in.events.append("replay")
                result = captured["work"](captured["step"].static_x, captured["at"])
                captured["step"].static_result.copy_(result)

            def pool(self):
                return (0, 1)

            def reset(self):
                stand_in.events.append("reset")

        class Device:
            def __init__(self, device):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", StreamContext)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(
            torch._C,
            "_cuda_endAllocateToPool",
            lambda device, pool: self.events.append("end_pool"),
            raising=False,
        )
        monkeypatch.setattr(
            step_module, "reset_generator", lambda device: self.events.append("reset_generator")
        )


def graph_fixture(monkeypatch, *, fail: bool = False):
    """A small model's training step under CapturedStep with stand-in CUDA, and an eager twin
    of the same model that every step must match exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
    twin = [torch.nn.Sequential(*[type(m)(6, 6) if m._parameters else m for m in model])]
    twin[0].load_state_dict(model.state_dict())

    def make_work(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

        def work(x, step):
            optimizer.zero_grad()
            # a weight that changes with the step until first_step (as the KL warm-up does):
            # a replay repeats the captured step's
            loss = (net(x) - x).pow(2).mean() * (1 + min(step, 2))
            loss.backward()
            optimizer.step()
            return loss.detach().reshape(1)

        return work

    captured: dict = {
        "save": lambda: {k: v.clone() for k, v in model.state_dict().items()},
        "restore": model.load_state_dict,
    }
    stand_in = StandInCuda(monkeypatch, captured)
    stand_in.fail_capture = fail
    work = make_work(model)

    def recording(x, step):
        if stand_in.events[-1:] == ["capture_begin"]:
            captured["at"] = step
        return work(x, step)

    notices: list[str] = []
    step = CapturedStep(recording, batch_size=4, first_step=2, notice=notices.append)
    captured.update(step=step, work=work)
    return step, make_work(twin[0]), stand_in, notices


def test_captured_step_warms_up_captures_and_replays(monkeypatch):
    """Steps before first_step and smaller batches run eagerly; then WARMUP eager steps on the
    side stream, one capture, and replays for every full batch."""
    step, eager, stand_in, notices = graph_fixture(monkeypatch)
    batches = [torch.randn(4 if i % 4 else 3, 6, generator=torch.Generator().manual_seed(i))
               for i in range(12)]  # fmt: skip
    for i, x in enumerate(batches):
        assert torch.equal(step(x, i if i != 0 else 0), eager(x, i)), i
    # steps 0, 1: before first_step; 4 and 8: batches of 3; 2, 3, 5: warm-up; 6: capture
    assert stand_in.events.count("capture_begin") == 1 and "reset" not in stand_in.events
    assert step.warm == CapturedStep.WARMUP and step.replays == 1 + 4  # 6 (capture), 7, 9-11
    assert not step.failed and not notices and stand_in.streams == []


def test_a_failed_capture_leaves_the_side_stream_and_the_graph_pool(monkeypatch):
    """An invalidated capture (an operation that synchronises with the host) raises from
    capture_end: the current stream is restored, the allocator's capture pool ended, the
    generator reset, one notice, and every later step trains eagerly, as the eager twin does."""
    step, eager, stand_in, notices = graph_fixture(monkeypatch, fail=True)
    batches = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(9)]
    for i, x in enumerate(batches):
        assert torch.equal(step(x, i), eager(x, i)), i
    assert stand_in.streams == []  # not left on the side stream
    assert "end_pool" in stand_in.events and "reset_generator" in stand_in.events
    assert step.failed and step.replays == 0 and stand_in.events.count("capture_begin") == 1
    assert len(notices) == 1 and "could not be captured" in notices[0]


def test_graph_obstacles_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    execution = Execution(CUDA0, "fp32", "contiguous")
    plain = load_config("cifar-cae").config
    assert graph_obstacle(plain, execution, 1) is None
    ms_ssim = load_config("cifar-cae", ["loss.ms_ssim_weight=0.1"]).config
    assert "MS-SSIM" in graph_obstacle(ms_ssim, execution, 1)
    assert "torchrun" in graph_obstacle(plain, execution, 2)
    assert "CUDA device" in graph_obstacle(plain, Execution(torch.device("cpu", 0), "auto"), 1)


# -- 5. free GPU memory counts PyTorch's cache ----------------------------------------------------


def test_free_gpu_memory_counts_what_the_cache_holds_unused(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    assert available_memory(CUDA0) == 22 * gib  # 2 free + 20 reserved and unused


# -- 8. bf16 only where the GPU has bf16 tensor cores -------------------------------------------


@pytest.fixture
def tf32_off():
    """TF32 for CUDA's matrix products off during the test, as it was after it (an attribute
    that monkeypatch cannot restore: torch computes it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize(
    "capability, dtype, described",
    [
        ((7, 0), None, "fp32, channels-last"),  # V100: emulated bf16, no TF32
        ((7, 5), None, "fp32, channels-last"),  # T4
        ((8, 0), torch.bfloat16, "bf16 autocast, channels-last"),  # A100
        ((9, 0), torch.bfloat16, "bf16 autocast, channels-last"),  # H100
    ],
)
def test_auto_precision_needs_bf16_tensor_cores(
    monkeypatch, tf32_off, capability, dtype, described
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    execution = Execution(CUDA0, "auto", "auto", BIG)
    assert execution.autocast_dtype == dtype and execution.describe() == described
    assert torch.backends.cuda.matmul.allow_tf32 is (capability >= (8, 0))
    small = Execution(CUDA0, "auto", "auto", ModelCost(forward_flops=1000, group_norm=False))
    assert small.describe() == ("fp32 (TF32)" if dtype else "fp32") + ", channels-last"
    # the other CUDA-only choices, without a GPU
    assert execution.optimizer_options() == {"fused": True} and execution.pins_memory


def test_cuda_choices_without_a_gpu(monkeypatch, tf32_off, tiny_weights, tiny_preset, tmp_path):
    """The other decisions taken only on CUDA: the execution policy from a config (its cost
    counted), the device's description and peak, the default inference batch from free
    memory, the data set placed on the GPU when it fits, cuDNN autotuning while training."""
    from aecli.data import load_data
    from aecli.devices import describe, peak_flops
    from aecli.inference import Predictor
    from aecli.inference.predictor import MAX_AUTO_BATCH

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    execution = Execution.for_config(CUDA0, load_config("cat-kl-f8").config)
    assert execution.cost is not None and execution.describe() == "bf16 autocast, contiguous"
    assert describe(CUDA0) == "cuda:0 (NVIDIA H100 80GB HBM3)"
    assert peak_flops(CUDA0, torch.bfloat16) == 2 * peak_flops(CUDA0, None) == 989e12

    free = [1 << 40]
    for module in (aecli.inference.predictor, aecli.engine.trainer):
        monkeypatch.setattr(module, "available_memory", lambda device: free[0])
    predictor = Predictor(tiny_weights, "cpu")
    predictor.device = CUDA0  # what batch_size decides from, nothing runs there
    assert predictor.batch_size(None) == MAX_AUTO_BATCH and predictor.batch_size(7) == 7
    free[0] = 1 << 20
    assert predictor.batch_size(None) == 32

    config = load_config(str(tiny_preset)).config
    data = load_data(None, config.data, 0)
    trainer = trainer_in(config, data, tmp_path / "run", preset="tiny", device="cpu")
    trainer.device = CUDA0
    images = trainer.train_data.images
    free[0] = 4 * images.numel() - 1
    assert trainer._place(images) is images  # more than a quarter of free memory: on the host

    seen = []
    with deterministic(False, autotune=True):
        seen.append(torch.backends.cudnn.benchmark)
    assert seen == [True] and not torch.backends.cudnn.benchmark


# -- 9. the NCCL process group ----------------------------------------------------------------


def test_nccl_group_is_bound_to_the_rank_gpu_and_left_at_the_end(monkeypatch):
    pretend_torchrun(monkeypatch, gpus=2)
    calls: list[tuple] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init" for c in calls))

    def init_process_group(backend, *, device_id=None):  # the signature NCCL's binding needs
        calls.append(("init", backend, {"device_id": device_id}))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(("barrier", kw)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    device = aecli.devices.resolve_device("cuda")
    group = setup_distributed(device)
    assert (group.rank, group.world) == (1, 2)
    assert calls == [("init", "nccl", {"device_id": device})]
    group.barrier()
    assert calls[-1] == ("barrier", {"device_ids": [1]})
    group.close()
    assert calls[-1] == ("destroy",)


# -- 7. encode --sample draws the same noise whatever the batch size ----------------------------


def test_sampled_latents_do_not_depend_on_the_batch_size(tmp_path, cli):
    weights = train_weights(
        tmp_path / "vae",
        TINY,
        ["model.latent.dim=10", "model.latent.variational=true", "train.epochs=1"],
    )
    for i in range(40):
        write_image(tmp_path / "in" / f"{i:02d}.png", seed=i)
    files = {}
    for batch in (32, 13):
        files[batch] = tmp_path / f"z{batch}.npy"
        ran = cli(
            "encode", weights, tmp_path / "in", "--sample", "--seed", 5,
            "--batch-size", batch, "-o", files[batch], "--device", "cpu",
        )  # fmt: skip
        assert ran.exit_code == 0, ran.output
    # the same noise: equal but for the last bits of the encoder's own arithmetic, which vary
    # with the batch's shape on the CPU (before, 319 of 600 values got other noise)
    a, b = np.load(files[32]), np.load(files[13])
    assert a.shape == (40, 10) and np.abs(a - b).max() < 1e-5
    mean = tmp_path / "mean.npy"
    assert cli("encode", weights, tmp_path / "in", "-o", mean, "--device", "cpu").exit_code == 0
    assert not np.array_equal(a, np.load(mean))  # a real draw


# -- 6. Ctrl-C under torchrun -------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_and_resumes(tiny_preset, tmp_path):
    """SIGINT to the whole process group (what Ctrl-C in a terminal sends) after the first
    checkpoint: the ranks agree on a step, validate together, rank 0 writes the weights and
    the checkpoint, state.json says interrupted, and the run resumes to its end."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "aecli", "train", *args, "--device", "cpu",
        ]  # fmt: skip

    process = subprocess.Popen(
        torchrun(str(tiny_preset), "--out", str(run), "--epochs", "200")
        + ["--set", "train.log_every=1", "--set", "train.checkpoint_every=2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "interrupted", (state, stderr)
    # each rank exits 130; torchrun, signalled itself, reports its own SignalException (1)
    assert process.returncode != 0, stderr
    assert "Resume with: aecli train --resume" in stderr
    assert (run / "model.safetensors").is_file()
    epoch = load_checkpoint(run / "checkpoint.safetensors")["train_state"]["epoch"]
    resumed = subprocess.run(
        torchrun("--resume", str(run), "--epochs", str(epoch + 1)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "state.json").read_text())["state"] == "finished"

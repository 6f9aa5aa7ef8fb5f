"""Long-run safety: exact resume, Ctrl-C, non-finite stops, SIGKILL, training options."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import epochs_of
from safetensors import safe_open

from aecli.config import load_config
from aecli.data import load_data
from aecli.errors import Interrupted
from aecli.io.checkpoint import load_checkpoint
from aecli.io.weights import load_weights
from aecli.run.files import RunDirectory
from aecli.run.setup import plan_resume
from aecli.run.training import resume, train

# a VAE with augmentation, EMA and a cosine schedule: every source of randomness and state
RICH = [
    "model.latent.variational=true",
    "loss.kl_weight=0.01",
    "loss.kl_warmup_steps=4",
    "data.augment.hflip=true",
    "data.augment.crop_scale=[0.7, 1.0]",
    "train.ema.decay=0.9",
    "optim.schedule.kind=step",
    "optim.schedule.step_epochs=1",
    "optim.schedule.gamma=0.7",
    "optim.schedule.warmup_steps=2",
    "train.epochs=4",
]
# a schedule that depends on the total number of steps can only be resumed mid-run
COSINE = ["optim.schedule.kind=cosine"]
# the CPU, and CUDA where there is a GPU
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


def weights(run: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(run / "model.safetensors"), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


class StopAt:
    """A reporter that presses Ctrl-C (sets the engine's flag) at a given step."""

    def __init__(self, step: int):
        self.at, self.trainer = step, None

    def start(self, **_):
        pass

    def step(self, *, epoch, step, metrics):
        if self.trainer.state.step == self.at:
            self.trainer._stop_requested = True

    def epoch(self, record):
        pass

    def notice(self, message):
        pass

    def finish(self):
        pass


def run_straight(tiny_preset, tmp_path, extra=()):
    config = load_config(str(tiny_preset), RICH + ["train.log_every=1", *extra]).config
    data = load_data(None, config.data, config.train.seed)
    train(config, data, tmp_path / "straight", preset="tiny", device="cpu")
    return config, data


@pytest.mark.parametrize("layout", ["auto", "contiguous"])  # auto: channels-last on the CPU
def test_resume_after_two_epochs_is_bit_exact(tiny_preset, tmp_path, layout):
    config, data = run_straight(tiny_preset, tmp_path, [f"train.memory_format={layout}"])
    half = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    train(half, data, tmp_path / "split", preset="tiny", device="cpu")
    plan = plan_resume(tmp_path / "split", epochs=4)
    result = resume(plan, data, tmp_path / "split", device="cpu")
    assert result.epochs == 4 and result.steps == 4 * 3
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    split, straight = RunDirectory(tmp_path / "split"), RunDirectory(tmp_path / "straight")
    assert [r["val_loss"] for r in split.history()] == [r["val_loss"] for r in straight.history()]
    # one window record per step (log_every 1), the same losses as the uninterrupted run's
    assert [(r["step"], r["loss"]) for r in split.windows()] == [
        (r["step"], r["loss"]) for r in straight.windows()
    ]
    assert len(split.windows()) == 4 * 3


def test_resume_from_mid_epoch_interrupt_is_bit_exact(tiny_preset, tmp_path):
    from aecli.run.training import trainer_in

    config, data = run_straight(tiny_preset, tmp_path, COSINE)
    reporter = StopAt(step=5)  # epoch 2 of 4, second of its three batches
    trainer = trainer_in(
        config, data, tmp_path / "cut", preset="tiny", reporter=reporter, device="cpu"
    )
    reporter.trainer = trainer
    with pytest.raises(Interrupted, match=r"aecli train --resume .*cut"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["train_state"]
    assert (state["epoch"], state["batch"], state["step"]) == (2, 2, 5)
    load_weights(tmp_path / "cut" / "model.safetensors")  # usable right away
    resume(plan_resume(tmp_path / "cut"), data, tmp_path / "cut", device="cpu")
    assert_same_weights(tmp_path / "straight", tmp_path / "cut")
    epochs = [r["epoch"] for r in epochs_of(tmp_path / "cut")]
    windows = RunDirectory(tmp_path / "cut").windows()
    assert [r["step"] for r in windows] == list(range(1, 13))  # none lost or repeated
    assert epochs == [1, 2, 3, 4]


def test_more_ctrl_c_while_an_interrupted_run_saves_and_records_its_end_are_ignored(
    tiny_preset, tmp_path, monkeypatch
):
    """Ctrl-C pressed twice: the second lands during the save or while fit writes state.json
    and the report. It must not turn into a KeyboardInterrupt that hides the resume command."""
    from aecli.run.training import trainer_in

    config = load_config(str(tiny_preset), ["train.epochs=4", "train.log_every=1"]).config
    data = load_data(None, config.data, config.train.seed)
    reporter = StopAt(step=5)
    trainer = trainer_in(
        config, data, tmp_path / "cut", preset="tiny", reporter=reporter, device="cpu"
    )
    reporter.trainer = trainer
    pressed = []

    def press_ctrl_c_then(method):
        def wrapper(*args, **kwargs):
            if trainer._stop_requested:
                pressed.append(method.__name__)
                os.kill(os.getpid(), signal.SIGINT)
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(trainer, "_save_checkpoint", press_ctrl_c_then(trainer._save_checkpoint))
    monkeypatch.setattr(trainer, "_record_end", press_ctrl_c_then(trainer._record_end))
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Interrupted, match=r"aecli train --resume .*cut"):
            trainer.fit()
    except KeyboardInterrupt:
        pytest.fail(f"a Ctrl-C after the first one became a KeyboardInterrupt (in {pressed[-1]})")
    assert pressed == ["_save_checkpoint", "_record_end"]
    assert RunDirectory(tmp_path / "cut").read_state().state == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_the_ema_update_records_no_autograd_history(tiny_preset, tmp_path):
    """The EMA is averaged outside autograd: its tensors carry no history, which would grow by
    a node a step and keep the parameters' gradient accumulators alive (on CUDA the step's graph
    capture then failed in backward)."""
    from aecli.run.training import trainer_in

    config = load_config(str(tiny_preset), [*RICH, "train.epochs=1"]).config
    data = load_data(None, config.data, config.train.seed)
    trainer = trainer_in(config, data, tmp_path / "run", preset="tiny", device="cpu")
    trainer.fit()
    averaged = [*trainer.ema.parameters(), *trainer.ema.buffers()]
    assert averaged and all(t.grad_fn is None and not t.requires_grad for t in averaged)


def test_resumed_optimizer_state_takes_the_parameters_layout(tiny_preset, tmp_path):
    """A checkpoint stores contiguous tensors; in a channels-last run (the default on CUDA,
    where fused Adam refuses a mix of layouts) Adam's state must come back channels-last."""
    from aecli.run.training import trainer_in

    extra = ["train.memory_format=channels_last"]
    config, data = run_straight(tiny_preset, tmp_path, extra)
    half = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    train(half, data, tmp_path / "split", preset="tiny", device="cpu")
    plan = plan_resume(tmp_path / "split", epochs=4)
    trainer = trainer_in(plan.config, data, tmp_path / "split", preset="tiny", device="cpu")
    trainer.restore(plan.checkpoint)
    kernels = [p for p in trainer.model.parameters() if p.ndim == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    for param in kernels:
        for key in ("exp_avg", "exp_avg_sq"):
            assert trainer.optimizer.state[param][key].stride() == param.stride(), key
    trainer.fit()
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


def test_optimizer_state_keeps_the_resuming_run_s_implementation():
    """Fused Adam runs on CUDA, the default one on the CPU: a checkpoint from either side must
    not switch the other's implementation, and the step counter goes where that one wants it."""
    from aecli.engine import load_optimizer_state

    def adam(fused):
        model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), fused=fused)
        model(torch.rand(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        return model, optimizer

    try:
        adam(True)
    except RuntimeError:
        pytest.skip("this torch has no fused Adam on the CPU")
    for saved_fused, resumed_fused in ((None, True), (True, None)):
        _, saved = adam(saved_fused)
        model, optimizer = adam(resumed_fused)
        load_optimizer_state(optimizer, saved.state_dict())
        assert optimizer.param_groups[0]["fused"] == resumed_fused
        state = optimizer.state[model.weight]
        assert state["step"].dtype == torch.float32 and state["step"].item() == 1
        assert state["exp_avg"].stride() == model.weight.stride()
        assert torch.equal(state["exp_avg"], saved.state[next(iter(saved.state))]["exp_avg"])
        model(torch.rand(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        assert state["step"].item() == 2


def test_a_run_killed_before_its_final_weights_resumes_to_write_them(
    tiny_preset, tmp_path, monkeypatch
):
    """Every epoch trained and checkpointed, then killed while computing the latent statistics:
    --resume trains nothing more but writes the final weights, after which it refuses."""
    import aecli.engine.trainer as engine
    from aecli.errors import UsageError

    config = load_config(str(tiny_preset)).config
    data = load_data(None, config.data, config.train.seed)
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise SystemExit(-9)

    monkeypatch.setattr(engine, "latent_statistics", killed)
    with pytest.raises(SystemExit):
        train(config, data, run, preset="tiny", device="cpu")
    monkeypatch.undo()
    assert load_weights(run / "model.safetensors")[1].latent_stats is None
    result = resume(plan_resume(run), data, run, device="cpu")
    assert result.epochs == 2 and result.steps == 2 * 3
    assert load_weights(run / "model.safetensors")[1].latent_stats["mean"].shape == (8,)
    with pytest.raises(UsageError, match="already finished 2 epochs"):
        plan_resume(run)


def test_resume_cli_refuses_a_finished_run_and_config_changes(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run).exit_code == 0
    result = cli("train", "--resume", run)
    assert result.exit_code == 2 and "already finished 2 epochs" in result.stderr
    result = cli("train", "--resume", run, "--set", "train.seed=3")
    assert result.exit_code == 2 and "drop --set" in result.stderr
    result = cli("train", "--resume", run, "--epochs", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(device, tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    # the learning rate jumps by 1e12 after the first epoch
    result = cli(
        "train",
        tiny_preset,
        "--out",
        run,
        "--device",
        device,
        "--epochs",
        "3",
        "--set",
        "optim.schedule.kind=step",
        "--set",
        "optim.schedule.step_epochs=1",
        "--set",
        "optim.schedule.gamma=1e12",
        "--set",
        "train.log_every=1",
    )
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "became non-finite" in message and "step 5" in message  # first step after the jump
    assert "last good checkpoint kept" in message and "Traceback" not in result.output
    assert load_checkpoint(run / "checkpoint.safetensors")["train_state"]["epoch"] == 2
    model, info = load_weights(run / "model.safetensors")  # finite, from epoch 1
    assert info.metrics["epoch"] == 1


def test_early_stopping_restores_best_weights(tiny_preset, tmp_path):
    config = load_config(
        str(tiny_preset),
        [
            "train.epochs=30",
            "optim.lr=0.05",
            "train.early_stopping.patience=2",
            "train.early_stopping.start_epoch=2",
            "train.early_stopping.min_delta=0.001",
        ],
    ).config
    data = load_data(None, config.data, config.train.seed)
    result = train(config, data, tmp_path / "run", preset="tiny")
    assert result.stopped_early and result.epochs < 30
    history = result.history
    best = min((r for r in history if r["epoch"] >= 2), key=lambda r: r["val_loss"])
    assert result.best_epoch <= best["epoch"]
    _, info = load_weights(tmp_path / "run" / "model.safetensors")
    assert info.metrics["epoch"] == result.best_epoch


def test_latent_statistics_are_stored_per_class(tiny_preset, tmp_path):
    config = load_config(str(tiny_preset)).config
    data = load_data(None, config.data, config.train.seed)
    train(config, data, tmp_path / "run", preset="tiny", device="cpu")
    model, info = load_weights(tmp_path / "run" / "model.safetensors")
    stats = info.latent_stats
    assert stats["mean"].shape == (8,) and stats["cov"].shape == (8, 8)
    assert stats["class_mean"].shape == (4, 8) and stats["class_cov"].shape == (4, 8, 8)
    assert torch.allclose(stats["cov"], stats["cov"].T)
    assert int(stats["class_count"].sum()) == int(stats["count"]) == 86
    # the stored mean is the mean of the training codes
    from aecli.data import split
    from aecli.devices import to_model_range

    train_part, _ = split(data, config.data.val_fraction, config.train.seed)
    with torch.no_grad():
        codes = model.encode(to_model_range(train_part.images, "unit")).mode()
    assert torch.allclose(stats["mean"], codes.mean(0), atol=1e-4)


def test_ssim_terms_are_logged(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    result = cli(
        "train",
        tiny_preset,
        "--out",
        run,
        "--epochs",
        "1",
        "--set",
        "loss.ssim_weight=0.5",
        "--set",
        "loss.ms_ssim_weight=0.5",
    )
    assert result.exit_code == 0, result.output
    record = epochs_of(run)[0]
    assert 0 < record["ssim"] < 1 and 0 < record["ms_ssim"] < 1 and "val_ssim" in record
    assert record["loss"] == pytest.approx(
        record["mse"] + 0.5 * record["ssim"] + 0.5 * record["ms_ssim"], rel=1e-4
    )


def test_learning_rate_schedules():
    from aecli.engine import learning_rate

    cosine = ["optim.schedule.kind=cosine", "optim.schedule.warmup_steps=10"]
    config = load_config("mnist-cae", ["optim.lr=1.0", *cosine, "optim.schedule.min_lr=0"]).config
    assert learning_rate(config, 0, 110, 10) == pytest.approx(0.1)
    assert learning_rate(config, 10, 110, 10) == pytest.approx(1.0)
    assert learning_rate(config, 60, 110, 10) == pytest.approx(0.5)
    assert learning_rate(config, 110, 110, 10) == pytest.approx(0.0)
    step = load_config(
        "mnist-cae",
        [
            "optim.lr=1.0",
            "optim.schedule.kind=step",
            "optim.schedule.step_epochs=2",
            "optim.schedule.gamma=0.5",
        ],
    ).config
    assert [learning_rate(step, s, 100, 10) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]


def test_grad_clip_is_applied(tiny_preset, tmp_path):
    from aecli.models import build_model

    def largest_move(extra: list[str], name: str) -> float:
        config = load_config(str(tiny_preset), ["train.epochs=1", *extra]).config
        torch.manual_seed(config.train.seed)
        initial = build_model(config).state_dict()
        train(config, load_data(None, config.data, 0), tmp_path / name, preset="tiny")
        trained = load_weights(tmp_path / name / "model.safetensors")[0].state_dict()
        return max(
            float((trained[k] - v).abs().max())
            for k, v in initial.items()
            if v.is_floating_point() and "running" not in k
        )

    lr = load_config(str(tiny_preset)).config.optim.lr
    # Adam moves each weight by about lr per step; gradients clipped to a norm of 1e-12 fall far
    # below Adam's epsilon (1e-8), so the clipped run barely moves
    assert largest_move([], "free") > 0.5 * lr
    assert largest_move(["optim.grad_clip=1e-12"], "clipped") < 0.05 * lr


def start_long_run(tiny_preset: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aecli",
            "train",
            str(tiny_preset),
            "--out",
            str(run),
            "--epochs",
            "500",
            "--set",
            "data.builtin_count=400",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_ctrl_c_saves_and_prints_the_resume_command(device, tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    process = start_long_run(tiny_preset, run, "--device", device)
    wait_for(run / "checkpoint.safetensors")
    process.send_signal(signal.SIGINT)
    time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # a second Ctrl-C during the save is ignored
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"aecli train --resume {run}" in stderr and "Traceback" not in stderr
    state = load_checkpoint(run / "checkpoint.safetensors")["train_state"]
    model, info = load_weights(run / "model.safetensors")
    assert info.metrics["step"] == state["step"]
    # the printed command works: finish the epoch that was cut (which has no step left when the
    # Ctrl-C landed on its last one)
    result = cli("train", "--resume", run, "--epochs", state["epoch"], "--device", device, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == state["epoch"] and summary["steps"] >= state["step"]
    assert load_weights(run / "model.safetensors")[1].metrics["epoch"] == state["epoch"]


@pytest.mark.slow
def test_sigkill_never_leaves_a_broken_weights_file(tiny_preset, tmp_path):
    run = tmp_path / "run"
    for delay in (0.3, 0.9, 1.7):
        process = start_long_run(tiny_preset, run, "--set", "train.checkpoint_every=1")
        wait_for(run / "model.safetensors")
        time.sleep(delay)
        process.kill()
        process.wait()
        load_weights(run / "model.safetensors")
        load_checkpoint(run / "checkpoint.safetensors")
        for leftover in run.glob(".*.tmp"):
            leftover.unlink()
        for name in ("model.safetensors", "checkpoint.safetensors", "config.yaml", "metrics.jsonl"):
            (run / name).unlink()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(tiny_preset, tmp_path):
    run, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "aecli",
            "train",
            str(tiny_preset),
            "--out",
            str(run),
            "--device",
            "cpu",  # gloo on the CPU, also where GPUs exist (two ranks may exceed them)
            *(["--log-to", "tensorboard"] if has_tensorboard else []),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count('"run_dir"') == 1  # only rank 0 prints the summary
    assert ran.stderr.count("Training finished") == 1
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "model.safetensors",
        "metrics.jsonl",
        "checkpoint.safetensors",
        "grids",
        "report.html",
        "state.json",
    }
    assert not list(run.glob(".*.tmp"))
    if has_tensorboard:  # one event file: only rank 0 logs
        assert len(list((run / "tensorboard").iterdir())) == 1
    load_weights(run / "model.safetensors")
    # two ranks of 16 images see the same 32 images per step as one process: same losses
    config = load_config(str(tiny_preset)).config
    data = load_data(None, config.data, config.train.seed)
    train(config, data, single, preset="tiny", device="cpu")
    ddp, one = epochs_of(run), epochs_of(single)
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["val_psnr"] == pytest.approx(b["val_psnr"], rel=1e-3)


def test_resume_with_config_edited_to_another_architecture_names_the_tensor(
    tiny_preset, tmp_path, cli
):
    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run, "--epochs", 1).exit_code == 0
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("out: 8", "out: 16", 1))
    result = cli("train", "--resume", run, "--epochs", 2)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0]
    assert "config.yaml describes another model than the checkpoint holds" in lines[0]
    assert "model.encoder.0" in lines[0] or "encoder.0" in lines[0]

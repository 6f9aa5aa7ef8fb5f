"""Devices: one resolution rule, and every command on another device giving what the CPU gives.

The other devices are `cuda` and `cuda:0` (marked `cuda`, skipped without a GPU) and `cpu:0`,
which runs everywhere: it is the CPU under an indexed name, and since
`torch.device("cpu:0") != torch.device("cpu")` (what a CPU tensor reports), a device compared
with `==` shows up in CI too. On `cpu:0` results must equal the CPU's exactly; on CUDA (bf16
autocast, channels-last, fused Adam) within the tolerances stated below.
"""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AECLI, ROOT, read_pngs, shell, write_image

import aecli.engine.trainer
from aecli.config import list_presets, load_config
from aecli.data import load_data
from aecli.devices import ModelCost, execution_plan, placed, resolve_device, same_device
from aecli.engine import Trainer
from aecli.errors import UsageError
from aecli.io.checkpoint import load_checkpoint
from aecli.io.latents import read_latents
from aecli.io.weights import load_weights
from aecli.run.setup import plan_resume
from aecli.run.training import resume, trainer_in

CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
NEEDS_TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
OTHER_DEVICES = [
    pytest.param("cpu:0", id="cpu:0"),
    pytest.param("cuda", id="cuda", marks=CUDA),
    pytest.param("cuda:0", id="cuda:0", marks=CUDA),
]


def on_cpu(device: str) -> bool:
    return device.startswith("cpu")


def assert_images_close(expected: dict, actual: dict, device: str) -> None:
    """Equal on the CPU; on CUDA (bf16 autocast) at most 3 levels apart on average per image."""
    assert sorted(actual) == sorted(expected)
    for name, image in expected.items():
        error = np.abs(image.astype(int) - actual[name].astype(int)).mean()
        assert error <= (0 if on_cpu(device) else 3), (name, error)


def assert_latents_close(expected: np.ndarray, actual: np.ndarray, device: str) -> None:
    """Equal on the CPU; on CUDA within 5% of the latents' mean magnitude."""
    assert actual.shape == expected.shape
    error = np.abs(expected - actual).mean()
    assert error <= (0 if on_cpu(device) else 0.05 * np.abs(expected).mean()), error


# -- resolving devices -------------------------------------------------------------------------


def test_devices_resolve_to_indexed_ones():
    assert str(resolve_device("cpu")) == str(resolve_device("cpu:0")) == "cpu:0"
    auto = resolve_device("auto")
    assert auto.index is not None and auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert same_device(resolve_device("cpu"), torch.zeros(1).device)  # reported as plain "cpu"
    assert not same_device(torch.device("cpu"), torch.device("cuda", 0))
    assert not same_device(torch.device("cuda", 0), torch.device("cuda", 1))
    if torch.cuda.is_available():
        assert str(resolve_device("cuda")) == f"cuda:{torch.cuda.current_device()}"
        assert same_device(resolve_device("cuda"), torch.zeros(1, device="cuda").device)


def test_a_model_on_cpu0_keeps_the_weights_it_read(tiny_weights, monkeypatch):
    """`Tensor.to(cpu:0)` copies a CPU tensor; the Predictor places its model on `cpu`, so the
    weights it read stay where they are (a 2.7 GB VAE's file pages, not a second copy). Only
    the channels-last layout, where the CPU runs in it, rewrites the 4-D ones."""
    import aecli.inference.predictor as predictor_module

    read = {}

    def spy(path):
        model, info = load_weights(path)
        read.update({name: t.data_ptr() for name, t in model.state_dict().items()})
        return model, info

    monkeypatch.setattr(predictor_module, "load_weights", spy)
    predictor = predictor_module.Predictor(tiny_weights, resolve_device("cpu:0"))
    kept = {n: t.data_ptr() for n, t in predictor.model.state_dict().items() if t.dim() != 4}
    assert kept and kept == {name: read[name] for name in kept}
    assert same_device(placed(resolve_device("cpu:0")), torch.zeros(1).device)


@pytest.mark.parametrize(
    "name, message",
    [
        ("cpu:1", "there is one CPU device"),
        ("meta", "aecli runs on cpu or cuda"),
        ("tpu", "not a device"),
        ("gpu0", "not a device"),
        pytest.param(
            "cuda",
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        pytest.param("cuda:99", "no such GPU", marks=CUDA),
    ],
)
def test_bad_devices_are_one_line(name, message, tiny_weights, tmp_path, cli):
    result = cli("reconstruct", tiny_weights, tmp_path, "-o", tmp_path / "o", "--device", name)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--device {name}" in lines[0] and message in lines[0], lines


def pretend_gpus(monkeypatch, gpus: int) -> list[torch.device]:
    """CUDA with `gpus` GPUs as resolve_device sees it; the devices it makes current, in order."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    return made_current


def test_a_gpu_device_becomes_the_current_one(monkeypatch):
    """`--device cuda:1` in one process: whatever takes the implicit device means cuda:1."""
    made_current = pretend_gpus(monkeypatch, 2)
    assert str(resolve_device("cuda:1")) == "cuda:1"
    assert [str(d) for d in made_current] == ["cuda:1"]
    resolve_device("cpu")
    assert len(made_current) == 1  # the CPU leaves CUDA's current device alone


def pretend_torchrun(monkeypatch, *, gpus: int, processes: int = 2, local_rank: int = 1):
    made_current = pretend_gpus(monkeypatch, gpus)
    for key, value in {
        "WORLD_SIZE": processes,
        "LOCAL_WORLD_SIZE": processes,
        "RANK": local_rank,
        "LOCAL_RANK": local_rank,
    }.items():
        monkeypatch.setenv(key, str(value))
    return made_current


def test_torchrun_gives_each_process_the_gpu_of_its_local_rank(monkeypatch):
    made_current = pretend_torchrun(monkeypatch, gpus=2)
    assert str(resolve_device("auto")) == str(resolve_device("cuda")) == "cuda:1"
    assert {str(d) for d in made_current} == {"cuda:1"}  # NCCL's device, before it starts
    assert str(resolve_device("cpu")) == "cpu:0"  # --device cpu: gloo, GPUs or not
    with pytest.raises(UsageError, match=r"--device cuda:0: under torchrun .*LOCAL_RANK"):
        resolve_device("cuda:0")


def test_torchrun_with_more_processes_than_gpus_is_refused(monkeypatch):
    pretend_torchrun(monkeypatch, gpus=1)
    with pytest.raises(UsageError) as caught:
        resolve_device("auto")
    message = str(caught.value)
    assert "torchrun started 2 processes" in message and "1 GPU is visible" in message
    assert "--device cpu" in message and "\n" not in message


def test_no_module_compares_devices_with_equality():
    """`torch.device("cuda") != torch.device("cuda:0")`: devices go through same_device."""

    def is_device(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "device"
        if isinstance(node, ast.Name):
            return "device" in node.id
        if isinstance(node, ast.Call):
            return ast.unparse(node.func) == "torch.device"
        return False

    found = []
    for path in sorted((ROOT / "aecli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            pairs = zip([node.left, *node.comparators[:-1]], node.comparators, strict=True)
            for op, (left, right) in zip(node.ops, pairs, strict=True):
                equality = isinstance(op, ast.Eq | ast.NotEq | ast.Is | ast.IsNot)
                if equality and (is_device(left) or is_device(right)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


# -- every command on another device -----------------------------------------------------------


@pytest.fixture
def mixed_photos(tmp_path) -> Path:
    """Images of several sizes, some not multiples of the conv model's factor 4."""
    root = tmp_path / "photos"
    sizes = {"a.png": (16, 16), "b.jpg": (24, 20), "x/c.png": (13, 29), "x/d.png": (32, 32)}
    for i, (name, size) in enumerate(sizes.items()):
        write_image(root / name, size=size, seed=i)
    return root


def run_both(cli, device: str, tmp_path: Path, name: str, *args) -> dict[str, Path]:
    """Run one command on the CPU and on `device`; `{out}` in args becomes a per-device path."""
    outs = {}
    for where in ("cpu", device):
        out = tmp_path / f"{name}-{where.replace(':', '_')}"
        filled = [str(a).replace("{out}", str(out)) for a in args]
        result = cli(*filled, "--device", where)
        assert result.exit_code == 0, (where, result.output)
        outs[where] = out
    return outs


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_reconstruct_and_diff_match_the_cpu(
    device, mixed_photos, tmp_path, tiny_weights, other_weights, conv_weights, cli
):
    # vector model (images stretched to 16x16) and fully convolutional (each at its own size)
    for label, weights in (("vector", tiny_weights), ("conv", conv_weights)):
        outs = run_both(
            cli, device, tmp_path, label, "reconstruct", weights, mixed_photos, "-o", "{out}"
        )
        cpu, other = read_pngs(outs["cpu"]), read_pngs(outs[device])
        if label == "conv":
            assert cpu["x/c.png"].shape == (13, 29, 3)
        assert_images_close(cpu, other, device)
    rows = {}
    for where in ("cpu", device):
        sheet = tmp_path / f"diff-{where.replace(':', '_')}.png"
        args = ["diff", tiny_weights, mixed_photos, "--vs", other_weights, "-o", sheet, "--json"]
        result = cli(*args, "--device", where)
        assert result.exit_code == 0, result.output
        assert sheet.is_file()
        rows[where] = {r["file"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows["cpu"].keys() == rows[device].keys()
    for file, row in rows["cpu"].items():
        for key in ("psnr", "vs_psnr"):  # on CUDA within 0.5 dB
            gap = abs(row[key] - rows[device][file][key])
            assert gap <= (0 if on_cpu(device) else 0.5), (file, key, gap)


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_encode_decode_and_pipes_match_the_cpu(
    device, mixed_photos, tmp_path, tiny_weights, conv_weights, cli
):
    outs = run_both(
        cli, device, tmp_path, "z", "encode", tiny_weights, mixed_photos, "-o", "{out}.safetensors"
    )
    z_cpu = f"{outs['cpu']}.safetensors"
    assert_latents_close(
        read_latents(z_cpu).latents.numpy(),
        read_latents(f"{outs[device]}.safetensors").latents.numpy(),
        device,
    )
    # the CPU's latent file decoded on both
    outs = run_both(cli, device, tmp_path, "dec", "decode", tiny_weights, z_cpu, "-o", "{out}")
    decoded = read_pngs(outs["cpu"])
    assert sorted(decoded) == ["a.png", "b.png", "x/c.png", "x/d.png"]
    assert_images_close(decoded, read_pngs(outs[device]), device)

    # --sample: the same seed draws the same noise on every device
    mean = tmp_path / "mean.npy"
    assert cli("encode", conv_weights, mixed_photos, "-o", mean, "--device", "cpu").exit_code == 0
    outs = run_both(
        cli, device, tmp_path, "s", "encode", conv_weights, mixed_photos, "--sample", "--seed", 3,
        "-o", "{out}.npy",
    )  # fmt: skip
    sampled_cpu, sampled = np.load(f"{outs['cpu']}.npy"), np.load(f"{outs[device]}.npy")
    noise = np.abs(sampled_cpu - np.load(mean)).mean()
    assert noise > 0.05  # a real draw, not the mean
    gap = np.abs(sampled - sampled_cpu).mean()
    assert gap <= (0 if on_cpu(device) else 0.2 * noise), (gap, noise)

    # a shell pipe on the device
    out = tmp_path / "piped"
    command = (
        f'{AECLI} encode "{tiny_weights}" "{mixed_photos}" -o - --device {device} '
        f'| {AECLI} decode "{tiny_weights}" - -o "{out}" --device {device}'
    )
    done = shell(command)
    assert done.returncode == 0, done.stderr
    assert_images_close(decoded, read_pngs(out), device)


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_sample_and_interpolate_match_the_cpu(device, tmp_path, tiny_weights, conv_weights, cli):
    a, b = tmp_path / "in" / "a.png", tmp_path / "in" / "b.png"
    write_image(a, seed=1)
    write_image(b, seed=2)
    for label, weights in (("ae", tiny_weights), ("vae", conv_weights)):
        outs = run_both(
            cli, device, tmp_path, f"sample-{label}", "sample", weights, "-n", 4, "--seed", 9,
            "--latents-out", "{out}.npy", "-o", "{out}",
        )  # fmt: skip
        # the noise is drawn on the CPU, so the latents are identical on every device
        assert np.array_equal(np.load(f"{outs['cpu']}.npy"), np.load(f"{outs[device]}.npy"))
        assert_images_close(read_pngs(outs["cpu"]), read_pngs(outs[device]), device)
        outs = run_both(
            cli, device, tmp_path, f"path-{label}", "interpolate", weights, a, b, "--mode",
            "slerp", "--steps", 5, "-o", "{out}",
        )  # fmt: skip
        assert_images_close(read_pngs(outs["cpu"]), read_pngs(outs[device]), device)


# -- training on another device ----------------------------------------------------------------

# a VAE with augmentation and an EMA: the state a resume must carry over
RESUMABLE = [
    "model.latent.variational=true",
    "loss.kl_weight=0.01",
    "data.augment.hflip=true",
    "train.ema.decay=0.9",
    "train.log_every=1",
]


def fit(preset: Path, run: Path, device: str, epochs: int, extra=()) -> list[dict]:
    config = load_config(str(preset), [*RESUMABLE, f"train.epochs={epochs}", *extra]).config
    return trained(config, run, device).fit().history


def trained(config, run: Path, device: str) -> Trainer:
    """A trainer for `config` on the built-in shapes (fit() trains it)."""
    data = load_data(None, config.data, config.train.seed)
    return trainer_in(config, data, run, preset="tiny", device=device)


def resumed(run: Path, device: str, epochs: int) -> list[dict]:
    plan = plan_resume(run, epochs)
    data = load_data(None, plan.config.data, plan.config.train.seed)
    return resume(plan, data, run, device=device).history


def val_losses(history: list[dict]) -> list[float]:
    return [r["val_loss"] for r in history]


def assert_losses_close(expected: list[float], actual: list[float], rel: float) -> None:
    assert len(actual) == len(expected)
    if rel == 0:
        assert actual == expected
    else:
        assert actual == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_training_and_resume_match_the_cpu(device, tiny_preset, tmp_path):
    """On CUDA: within 5% of the CPU's validation losses (bf16), a resumed run within 1% of the
    uninterrupted one, and a checkpoint moves between the CPU and the GPU both ways."""
    cpu = val_losses(fit(tiny_preset, tmp_path / "cpu", "cpu", 3))
    straight = val_losses(fit(tiny_preset, tmp_path / "straight", device, 3))
    assert_losses_close(cpu, straight, 0 if on_cpu(device) else 0.05)

    fit(tiny_preset, tmp_path / "split", device, 2)
    assert_losses_close(
        straight, val_losses(resumed(tmp_path / "split", device, 3)), 0 if on_cpu(device) else 0.01
    )
    # a CPU checkpoint resumed on the device, and the device's checkpoint resumed on the CPU
    fit(tiny_preset, tmp_path / "from-cpu", "cpu", 2)
    onto_device = val_losses(resumed(tmp_path / "from-cpu", device, 3))
    fit(tiny_preset, tmp_path / "from-device", device, 2)
    onto_cpu = val_losses(resumed(tmp_path / "from-device", "cpu", 3))
    for losses in (onto_device, onto_cpu):
        assert_losses_close(cpu, losses, 0 if on_cpu(device) else 0.05)


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_deterministic_resume_is_bit_exact(device, tiny_preset, tmp_path):
    from test_engine import assert_same_weights

    extra = ["train.deterministic=true"]
    fit(tiny_preset, tmp_path / "straight", device, 3, extra)
    fit(tiny_preset, tmp_path / "split", device, 2, extra)
    resumed(tmp_path / "split", device, 3)
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_training_uses_bf16_autocast_and_channels_last(
    compiled, tiny_preset, tmp_path, monkeypatch
):
    """Asked for bf16 and channels-last, the model runs in bf16 on channels-last tensors on CUDA
    (eager: seen by a hook on the first convolution; compiled: the hook would break the graph)
    and its validation losses stay within 5% of the CPU's fp32 run."""
    config = load_config(
        str(tiny_preset),
        [
            "train.epochs=3",
            "optim.lr=3e-3",
            f"train.compile={str(compiled).lower()}",
            "train.precision=bf16",
            "train.memory_format=channels_last",
        ],
    ).config
    trainer = trained(config, tmp_path / "cuda", "cuda")
    assert trainer.execution.autocast_dtype == torch.bfloat16
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen, in_statistics = [], []
    if not compiled:
        # every pass but the latent statistics' (fp32 on purpose, for the stored moments)
        first_conv.register_forward_hook(
            lambda module, inputs, output: (
                None
                if in_statistics
                else seen.append(
                    (inputs[0].is_contiguous(memory_format=torch.channels_last), output.dtype)
                )
            )
        )
        statistics = aecli.engine.trainer.latent_statistics

        def flagged(*args, **kwargs):
            in_statistics.append(True)
            try:
                return statistics(*args, **kwargs)
            finally:
                in_statistics.clear()

        monkeypatch.setattr(aecli.engine.trainer, "latent_statistics", flagged)
    cuda = val_losses(trainer.fit().history)
    if not compiled:
        assert seen and all(layout and dtype == torch.bfloat16 for layout, dtype in seen), set(seen)
    state = trainer.optimizer.state[first_conv.weight]
    assert state["exp_avg"].stride() == first_conv.weight.stride()
    cpu = val_losses(trained(config, tmp_path / "cpu", "cpu").fit().history)
    assert cuda[-1] < cuda[0]
    assert cuda == pytest.approx(cpu, rel=0.05)


@pytest.mark.parametrize(
    "preset, precision, layout",
    [
        ("mnist-cae", None, "channels_last"),  # tiny: fp32 on TF32, no casts
        ("cifar-cae", None, "channels_last"),
        ("cifar-res", None, "contiguous"),  # GroupNorm
        ("dog-vae", torch.bfloat16, "channels_last"),  # 0.53 GFLOPs per image
        ("cat-kl-f8", torch.bfloat16, "contiguous"),  # 895 GFLOPs, GroupNorm
    ],
)
def test_auto_execution_follows_the_model(preset, precision, layout):
    """`auto` on CUDA: bf16 autocast from 0.25 GFLOPs per image, channels-last without
    GroupNorm; on the CPU fp32 and channels-last, GroupNorm or not; explicit settings are kept
    as given."""
    config = load_config(preset, []).config
    cost = ModelCost.of(config)
    assert execution_plan("cuda", "auto", "auto", cost) == (precision, layout)
    assert execution_plan("cpu", "auto", "auto", cost) == (None, "channels_last")
    explicit = execution_plan("cuda", "fp32", "contiguous", cost)
    assert explicit == (None, "contiguous")
    assert execution_plan("cuda", "bf16", "channels_last", cost) == (
        torch.bfloat16,
        "channels_last",
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_autotunes_and_says_how_it_ran(tiny_preset, tmp_path):
    """A CUDA run benchmarks cuDNN's algorithms while it trains (and restores the setting), and
    state.json and the report say which precision and layout it used."""
    config = load_config(str(tiny_preset), ["train.epochs=1"]).config
    trainer = trained(config, tmp_path / "run", "cuda")
    seen = []
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.benchmark
    trainer.fit()
    assert seen and all(seen) and torch.backends.cudnn.benchmark == before
    described = json.loads((tmp_path / "run" / "state.json").read_text())["execution"]
    assert described == trainer.execution.describe() == "fp32 (TF32), channels-last"
    assert described in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", [p.name for p in list_presets()])
def test_every_preset_trains_on_cuda_like_on_the_cpu(preset, tmp_path):
    """A few steps of each bundled preset (cat-kl-f8 at 32x32, its discriminator on, LPIPS off:
    its VGG weights are a download): the validation loss on CUDA is within 10% of the CPU's."""
    overrides = [
        "train.epochs=1",
        "train.batch_size=4",
        "train.grid_images=2",
        "data.builtin_count=20",
        "data.val_fraction=0.2",
    ]
    if preset == "cat-kl-f8":  # at 32x32; the discriminator from the first step, no LPIPS
        overrides += ["data.image_size=32", "loss.disc_start=0", "loss.perceptual_weight=0"]
    config = load_config(preset, overrides).config
    data = load_data(None, config.data, config.train.seed)
    losses = {}
    for device in ("cpu", "cuda"):
        trainer = trainer_in(config, data, tmp_path / device, preset=preset, device=device)
        losses[device] = trainer.fit().history[-1]["val_loss"]
    assert np.isfinite(losses["cuda"])
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=0.1)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchrun_with_more_processes_than_gpus_is_one_line(tiny_preset, tmp_path):
    import subprocess
    import sys

    processes = torch.cuda.device_count() + 1
    ran = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "aecli", "train", str(tiny_preset),
            "--out", str(tmp_path / "run"), "--device", "cuda",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode != 0
    assert f"torchrun started {processes} processes" in ran.stderr
    assert "--device cpu" in ran.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.cuda
@pytest.mark.slow
@NEEDS_TWO_GPUS
def test_torchrun_on_two_gpus_with_nccl(tiny_preset, tmp_path):
    import subprocess
    import sys

    ran = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "aecli", "train", str(tiny_preset), "--out", str(tmp_path / "run"), "--json",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["device"] == "cuda:0" and summary["epochs"] == 2


# -- the step as one CUDA graph ----------------------------------------------------------------

# On top of RESUMABLE (a VAE with flips and EMA): a KL warm-up and clipping, so that every part
# of a step that draws random numbers or changes with the step number goes through the graph.
GRAPHED = ["loss.kl_warmup_steps=4", "optim.grad_clip=1.0", "optim.lr=3e-3"]


def test_cuda_graph_without_cuda_is_a_notice(tiny_preset, tmp_path, cli):
    """`train.cuda_graph` where there is no CUDA: one warning, and the run trains exactly as
    without it."""
    for name, extra in (("plain", []), ("graph", ["--set", "train.cuda_graph=true"])):
        ran = cli("train", tiny_preset, "--out", tmp_path / name, "--device", "cpu", *extra)
        assert ran.exit_code == 0, ran.output
    assert "train.cuda_graph: CUDA graphs need a CUDA device; every step runs eagerly" in (
        ran.output
    )
    from test_engine import assert_same_weights

    assert_same_weights(tmp_path / "plain", tmp_path / "graph")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_trains_like_the_eager_one(tiny_preset, tmp_path):
    """Replayed graph steps give the eager run's losses (within 1%), a resumed graphed run the
    uninterrupted one's, and the checkpoint keeps a plain learning rate."""
    expected = val_losses(fit(tiny_preset, tmp_path / "eager", "cuda", 5, GRAPHED))
    graph = [*GRAPHED, "train.cuda_graph=true"]
    config = load_config(str(tiny_preset), [*RESUMABLE, "train.epochs=5", *graph]).config
    trainer = trained(config, tmp_path / "graph", "cuda")
    history = trainer.fit().history
    captured = trainer.train_step.graph
    assert captured is not None and not captured.failed
    # 5 epochs of 86 images: batches of 32, 32 and 22 (steps 0-14). The full ones from step 4
    # (after the KL ramp) are 4, 6, 7, 9, 10, 12, 13: 3 eager warm-up steps, then 4 replays
    assert captured.replays == 4
    assert_losses_close(expected, val_losses(history), 0.01)

    fit(tiny_preset, tmp_path / "split", "cuda", 3, graph)
    assert_losses_close(expected, val_losses(resumed(tmp_path / "split", "cuda", 5)), 0.01)
    saved = load_checkpoint(tmp_path / "split" / "checkpoint.safetensors")
    assert all(isinstance(g["lr"], float) for g in saved["optimizer"]["param_groups"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inference_batches_fill_the_gpu(tiny_weights, conv_weights):
    """On CUDA a fixed-size model's default batch is as large as a quarter of free memory
    allows, up to 512; a fully convolutional model (any image size) keeps 32."""
    from aecli.inference import Predictor
    from aecli.inference.predictor import MAX_AUTO_BATCH

    assert Predictor(tiny_weights, "cuda").batch_size(None) == MAX_AUTO_BATCH  # 16x16 images
    assert Predictor(conv_weights, "cuda").batch_size(None) == 32
    assert Predictor(tiny_weights, "cuda").batch_size(7) == 7


@pytest.mark.parametrize(
    "index", [pytest.param(0, marks=CUDA), pytest.param(1, marks=[*CUDA, NEEDS_TWO_GPUS])]
)
def test_host_copies_are_complete_after_the_wait(index):
    """reconstruct's results come to the host without blocking; after the wait they hold the
    device's values, also on a GPU that is not the process's current one (`--device cuda:1`,
    whose copies queue on that GPU's stream)."""
    from aecli.devices import Execution

    device = torch.device("cuda", index)
    x = torch.randn(4096, 4096, device=device)
    results = [x @ x for _ in range(4)]  # long enough work that an early read would show
    copies, wait = Execution.to_host(results)
    wait()
    for copy, result in zip(copies, results, strict=True):
        assert copy.device.type == "cpu" and torch.equal(copy, result.cpu())

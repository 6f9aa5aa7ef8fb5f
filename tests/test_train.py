import json
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import epochs_of
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import aecli
from aecli.config import config_from_dict, load_config
from aecli.io.weights import load_weights


def test_train_writes_a_complete_run_directory(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", tiny_preset, "--out", run, "--set", "train.grid_images=3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["run_dir"] == str(run) and summary["epochs"] == 2

    config = load_config(str(tiny_preset), ["train.grid_images=3"]).config
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert config_from_dict(stored, "config.yaml") == config

    records = epochs_of(run)
    assert [r["epoch"] for r in records] == [1, 2]
    for key in (
        "epoch",
        "step",
        "loss",
        "mse",
        "val_loss",
        "val_mse",
        "val_psnr",
        "lr",
        "images_per_s",
    ):
        assert all(key in r for r in records), key
    assert records[-1]["step"] == 2 * 3  # 86 training images, batches of 32

    for epoch in (1, 2):
        grid = Image.open(run / "grids" / f"epoch-{epoch:04d}.png")
        # 3 validation images over their reconstructions; 16 px tiles enlarged to 64
        assert grid.size == (2 + 3 * 66, 2 + 2 * 66)

    with safe_open(str(run / "model.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["aecli_version"] == aecli.__version__
    assert json.loads(meta["config"]) == config.model_dump(mode="json")
    assert json.loads(meta["data"])["kind"] == "builtin-shapes"
    assert json.loads(meta["class_names"]) == ["circle", "square", "triangle", "ring"]
    assert json.loads(meta["metrics"])["val_psnr"] == pytest.approx(records[-1]["val_psnr"])
    assert meta["fingerprint"] == summary["fingerprint"]


def test_weights_rebuild_the_model_alone(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run).exit_code == 0
    model, info = load_weights(run / "model.safetensors")
    assert info.preset == "tiny" and info.class_names[0] == "circle"
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        again, _ = load_weights(run / "model.safetensors")
        assert torch.equal(model(x, sample=False).image, again(x, sample=False).image)
    result = cli("info", run / "model.safetensors", "--json")
    facts = json.loads(result.stdout)
    assert facts["kind"] == "weights" and facts["class_names"][1] == "square"
    assert facts["metrics"]["epoch"] == 2 and facts["latent_shape"] == [8]


def test_training_is_reproducible_with_a_seed(tiny_preset, tmp_path, cli):
    for name in ("a", "b"):
        args = ("--out", tmp_path / name, "--seed", "7", "--device", "cpu")
        assert cli("train", tiny_preset, *args).exit_code == 0
    a = load_weights(tmp_path / "a" / "model.safetensors")[0].state_dict()
    b = load_weights(tmp_path / "b" / "model.safetensors")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_overwritten(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run).exit_code == 0
    before = (run / "model.safetensors").read_bytes()
    result = cli("train", tiny_preset, "--out", run)
    assert result.exit_code == 2
    assert f"continue it with `aecli train --resume {run}`" in result.stderr
    assert (run / "model.safetensors").read_bytes() == before
    (run / "checkpoint.safetensors").unlink()  # weights alone: a finished, trained model
    result = cli("train", tiny_preset, "--out", run)
    assert result.exit_code == 2 and "already holds a trained model" in result.stderr
    assert (run / "model.safetensors").read_bytes() == before


def test_a_run_that_saved_nothing_does_not_block_its_folder(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", tiny_preset, "--out", run, "--lr", "1e12", "--set", "train.log_every=1")
    assert result.exit_code == 1 and "nothing was saved" in result.stderr
    assert (run / "config.yaml").exists() and not (run / "model.safetensors").exists()
    result = cli("train", tiny_preset, "--out", run, "--json")  # the same folder, a sane lr
    assert result.exit_code == 0, result.output
    records = epochs_of(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert load_weights(run / "model.safetensors")[1].metrics["epoch"] == 2


def test_vae_logs_each_loss_term(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    result = cli(
        "train",
        tiny_preset,
        "--out",
        run,
        "--epochs",
        "1",
        "--set",
        "model.latent.variational=true",
        "--set",
        "loss.kl_weight=0.01",
    )
    assert result.exit_code == 0, result.output
    record = epochs_of(run)[0]
    assert record["loss"] == pytest.approx(record["mse"] + 0.01 * record["kl"], rel=1e-4)
    assert record["kl"] > 0 and "val_kl" in record


def test_mnist_cae_on_real_digits_lowers_validation_loss(digits_npz, tmp_path, cli):
    run = tmp_path / "run"
    result = cli(
        "train",
        "mnist-cae",
        "--data",
        digits_npz,
        "--out",
        run,
        "--epochs",
        "5",
        "--batch-size",
        "32",
    )
    assert result.exit_code == 0, result.output
    val = [r["val_loss"] for r in epochs_of(run)]
    assert val[-1] < val[0] * 0.9
    assert sum(b < a for a, b in zip(val, val[1:], strict=False)) >= 3
    _, info = load_weights(run / "model.safetensors")
    assert info.class_names == [str(i) for i in range(10)]


def test_nan_loss_stops_with_one_line(tiny_preset, tmp_path, cli):
    result = cli("train", tiny_preset, "--out", tmp_path / "run", "--lr", "1e12", "--epochs", "3")
    assert result.exit_code == 1
    assert "became non-finite" in result.stderr and "step" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["missing", "pickle", "foreign", "nonfinite", "empty"])
def test_bad_weights_files_are_one_line(kind, tmp_path, cli):
    path = tmp_path / "model.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    elif kind == "foreign":
        save_file({"weight": torch.zeros(3)}, str(path))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "nonfinite":
        config = load_config("mnist-cae").config
        from aecli.models import build_model

        tensors = {k: v.clone() for k, v in build_model(config).state_dict().items()}
        next(iter(tensors.values()))[0] = float("nan")
        save_file(
            tensors,
            str(path),
            metadata={
                "format": "aecli-weights",
                "config": json.dumps(config.model_dump(mode="json")),
            },
        )
    result = cli("info", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    expected = {
        "missing": "file not found",
        "pickle": "pickle",
        "foreign": "neither aecli weights (no aecli metadata) nor a VAE",
        "nonfinite": "non-finite",
        "empty": "empty",
    }[kind]
    assert expected in lines[0]


def test_debug_shows_the_traceback(tmp_path, cli):
    with pytest.raises(Exception, match="file not found"):
        cli("--debug", "info", tmp_path / "missing.safetensors")


def test_python_m_aecli_lists_every_command():
    ran = subprocess.run([sys.executable, "-m", "aecli", "--help"], capture_output=True, text=True)
    assert ran.returncode == 0
    for command in (
        "train",
        "reconstruct",
        "encode",
        "decode",
        "sample",
        "interpolate",
        "diff",
        "presets",
        "info",
    ):
        assert command in ran.stdout


def test_presets_json_lists_descriptions(cli):
    listing = json.loads(cli("presets", "--json").stdout)
    assert {p["name"] for p in listing} >= {"mnist-cae", "cat-kl-f8"}
    assert all(p["description"] for p in listing)

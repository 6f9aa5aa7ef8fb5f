"""LPIPS as a loss term: wired with stand-in VGG16 weights (the real ones are a download aecli
never makes), and one line when the weights or the package are missing."""

import warnings

import pytest
import torch

lpips = pytest.importorskip("lpips")

from conftest import epochs_of  # noqa: E402

from aecli.perceptual import VGG16_FILE, load_lpips  # noqa: E402

PERCEPTUAL = ["--set", "loss.perceptual_weight=0.5", "--set", "data.builtin_count=48"]


@pytest.fixture
def stand_in_vgg(tmp_path, monkeypatch):
    """Random VGG16 feature weights saved under torchvision's file name, in a TORCH_HOME of the
    test's own; returns them under torchvision's keys."""
    from lpips import pretrained_networks

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = pretrained_networks.vgg16(pretrained=False)
    features = {}
    for key, value in net.state_dict().items():
        _, index, name = key.split(".")  # slice<n>.<features index>.<weight|bias>
        features[f"features.{index}.{name}"] = value
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(features, folder / VGG16_FILE)
    return features


def test_the_trunk_is_the_file_and_lpips_is_a_distance(stand_in_vgg):
    network = load_lpips(torch.device("cpu"))
    loaded = network.net.slice3.get_submodule("10").weight  # vgg16.features[10]
    assert torch.equal(loaded, stand_in_vgg["features.10.weight"])
    assert not any(p.requires_grad for p in network.parameters())
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert network(a, a).abs().max() < 1e-6
    assert (network(a, b) > 0).all()


def test_training_with_lpips_logs_the_term(stand_in_vgg, tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", tiny_preset, "--out", run, "--epochs", "1", "--device=cpu", *PERCEPTUAL)
    assert result.exit_code == 0, result.output
    record = epochs_of(run)[-1]
    assert record["perceptual"] > 0 and record["val_perceptual"] > 0


def test_missing_vgg_weights_stop_before_training(tmp_path, monkeypatch, tiny_preset, cli):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    run = tmp_path / "run"
    result = cli("train", tiny_preset, "--out", run, *PERCEPTUAL)
    assert result.exit_code == 2
    assert f"{tmp_path / 'empty' / 'hub' / 'checkpoints' / VGG16_FILE}, which is missing" in (
        result.output
    )
    assert "aecli never downloads" in result.output
    assert not run.exists()


def test_missing_lpips_package_is_one_line(monkeypatch, tiny_preset, tmp_path, cli):
    import sys

    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips now raises ImportError
    result = cli("train", tiny_preset, "--out", tmp_path / "run", *PERCEPTUAL)
    assert result.exit_code == 2
    assert "needs the lpips package: pip install 'aecli[lpips]'" in result.output


def test_damaged_vgg_weights_are_one_line(tmp_path, monkeypatch, tiny_preset, cli):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / VGG16_FILE).write_bytes(b"not a checkpoint")
    result = cli("train", tiny_preset, "--out", tmp_path / "run", *PERCEPTUAL)
    assert result.exit_code == 2
    assert f"{folder / VGG16_FILE} is not torchvision's VGG16 weights" in result.output
    assert "Traceback" not in result.output

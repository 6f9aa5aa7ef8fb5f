"""The adversarial objective of latent diffusion's autoencoder: hinge loss, adaptive weight,
the disc_start switch, its metrics and exact resume with the discriminator."""

import pytest
import torch
from conftest import epochs_of
from test_engine import RICH, StopAt, assert_same_weights

from aecli.config import load_config
from aecli.data import load_data
from aecli.devices import Execution, resolve_device
from aecli.engine.adversary import patch_grid
from aecli.engine.step import TrainStep
from aecli.errors import ConfigError, Interrupted
from aecli.losses import adaptive_weight, hinge_d_loss
from aecli.models import build_model
from aecli.models.discriminator import PatchDiscriminator
from aecli.run.setup import plan_resume
from aecli.run.training import resume, train, trainer_in

GAN = ["loss.disc_weight=0.5", "loss.disc_layers=2", "loss.disc_channels=8"]


def test_hinge_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x): 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))


def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    nll, g_loss = (w * a).sum(), (w * b).sum()  # gradients a (norm 5) and b (norm 1)
    weight = adaptive_weight(nll, g_loss, w, disc_weight=0.5)
    assert weight.item() == pytest.approx(5 / (1 + 1e-4) * 0.5)
    assert not weight.requires_grad
    tiny = (w * b * 1e-9).sum()  # a vanishing generator gradient: clamped to 1e4
    assert adaptive_weight(nll, tiny, w, 1.0).item() == pytest.approx(1e4)


def test_patch_discriminator_is_the_reference_size():
    """taming-transformers' NLayerDiscriminator(3, ndf=64, n_layers=3), counted from its code:
    conv 3->64 with bias, 64->128, 128->256 (stride 2) and 256->512 (stride 1) without bias,
    each with BatchNorm, then 512->1 with bias; 30x30 logits for a 256x256 image."""
    disc = PatchDiscriminator(3, 64, 3)
    convs = 3 * 64 * 16 + 64 + (64 * 128 + 128 * 256 + 256 * 512) * 16 + 512 * 16 + 1
    norms = 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in disc.parameters()) == convs + norms == 2_765_633
    with torch.no_grad():
        assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert patch_grid(256, 3) == 30


def test_disc_start_switches_the_discriminator_on(tiny_preset):
    config = load_config(str(tiny_preset), [*GAN, "loss.disc_start=2"]).config
    torch.manual_seed(0)
    step = TrainStep(config, build_model(config), Execution(resolve_device("cpu"), "fp32"))
    disc = step.adversary.discriminator
    x = torch.rand(8, 3, 16, 16)
    before = [p.detach().clone() for p in disc.parameters()]
    for n in range(2):
        values = dict(zip(step.names or [None] * 99, step(x, n, 1e-3).tolist(), strict=False))
        assert all(values.get(k, 0.0) == 0.0 for k in ("g_loss", "d_loss", "disc_weight"))
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))
    values = dict(zip(step.names, step(x, 2, 1e-3).tolist(), strict=False))
    assert values["disc_weight"] > 0 and values["d_loss"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))


def test_too_many_layers_for_the_image_is_one_line(tiny_preset):
    config = load_config(str(tiny_preset), ["loss.disc_weight=0.5", "loss.disc_layers=3"]).config
    with pytest.raises(ConfigError, match="loss.disc_layers 3: the discriminator shrinks"):
        TrainStep(config, build_model(config), Execution(resolve_device("cpu"), "fp32"))


def test_metrics_and_resume_with_the_discriminator(tiny_preset, tmp_path):
    """Interrupted mid-epoch after the discriminator started, resumed: the same weights as the
    uninterrupted run, and the adversarial terms in metrics.jsonl."""
    extra = [*RICH, *GAN, "loss.disc_start=3", "train.log_every=1"]
    config = load_config(str(tiny_preset), extra).config
    data = load_data(None, config.data, config.train.seed)
    train(config, data, tmp_path / "straight", preset="tiny", device="cpu")
    reporter = StopAt(step=7)
    cut = tmp_path / "cut"
    trainer = trainer_in(config, data, cut, preset="tiny", reporter=reporter, device="cpu")
    reporter.trainer = trainer
    with pytest.raises(Interrupted):
        trainer.fit()
    resume(plan_resume(tmp_path / "cut"), data, tmp_path / "cut", device="cpu")
    assert_same_weights(tmp_path / "straight", tmp_path / "cut")
    records = epochs_of(tmp_path / "cut")
    for key in ("g_loss", "d_loss", "disc_weight", "logits_real", "logits_fake"):
        assert all(key in r for r in records), key
    assert records[0]["d_loss"] == 0.0 and records[-1]["d_loss"] > 0  # 3 steps per epoch

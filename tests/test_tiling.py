"""Tiled encoding and decoding (--tile): the same images as without tiles, within 40 dB, at a
memory that follows the tile."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_CONV
from PIL import Image

from aecli.inference import Predictor
from aecli.io.vae_files import KLLayout
from aecli.io.weights import save_weights
from aecli.models import build_model
from aecli.tiling import Tiling, blend, cores, starts, tiled


def photo(size=(768, 1024)) -> torch.Tensor:
    """scikit-learn's first sample photo resized to `size`, uint8 (1, 3, H, W)."""
    from sklearn.datasets import load_sample_images

    image = Image.fromarray(load_sample_images().images[0]).resize(size[::-1])
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def save_random(path, config) -> None:
    torch.manual_seed(0)
    save_weights(
        path, build_model(config), config, preset="t", data={}, class_names=None, metrics={}
    )


def test_tiles_cover_the_axis_and_blend_weights_sum_to_one():
    offsets = starts(1000, 256, 64)
    assert offsets[0] == 0 and offsets[-1] == 1000 - 256
    assert all(b - a <= 256 - 64 for a, b in zip(offsets, offsets[1:], strict=False))
    shares = cores(1000, offsets, 256)
    assert shares[0][0] == 0 and shares[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
    total = torch.zeros(1000)
    for offset, (c0, c1) in zip(offsets, shares, strict=True):
        total[offset : offset + 256] += blend(256, (c0 - offset, c1 - offset), 32, "cpu")
    assert torch.allclose(total, torch.ones(1000))


@pytest.mark.slow
def test_tiled_matches_untiled_on_a_random_and_a_trained_model(tmp_path, conv_weights):
    """A 1024x768 photo through a random and a trained fully convolutional model: tiles of
    256 pixels give the untiled reconstruction to at least 40 dB."""
    import yaml

    from aecli.config import config_from_dict

    random_weights = tmp_path / "random.safetensors"
    save_random(random_weights, config_from_dict(yaml.safe_load(TINY_CONV), "tiny-conv"))
    image = photo()
    for weights in (random_weights, conv_weights):
        predictor = Predictor(weights, "cpu")
        whole = predictor.reconstruct(image)
        predictor.set_tiling(256, None, 8)
        tiles = predictor.reconstruct(image)
        assert tiles.shape == image.shape
        assert psnr(tiles, whole) >= 40, weights


def test_groupnorm_statistics_are_shared_across_tiles(tmp_path):
    """A KL-layout decoder (GroupNorm, attention-free) given the whole latent's GroupNorm
    statistics decodes tile by tile to the untiled image: what remains is the estimate."""
    import aecli.tiling as tiling

    torch.manual_seed(0)
    model = build_model(KLLayout(3, 3, (8, 16), 1, 4, norm_groups=8, mid_attention=False).config())
    z = torch.randn(1, 4, 48, 64)
    norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.inference_mode():
        whole = model.decode(z)
        exact = tiling.statistics(model.decode, norms, z)
        estimate = tiling._estimate
        tiling._estimate = lambda *_: exact
        try:
            tiles = tiled(model.decode, model.decoder, z, Tiling(32, 16), scale=2, batch_size=4)
        finally:
            tiling._estimate = estimate
    # only the missing context at tile edges differs: 40 dB below the image's spread
    assert (tiles - whole).pow(2).mean() < 1e-4 * whole.var()


def test_tiled_encode_and_decode_through_the_cli(tmp_path, cli, conv_weights):
    Image.fromarray(photo((200, 300))[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    z = tmp_path / "z.safetensors"
    result = cli(
        "encode", conv_weights, tmp_path / "a.png", "--size", "native", "--tile", "64", "-o", z
    )
    assert result.exit_code == 0, result.output
    result = cli("decode", conv_weights, z, "--tile", "64", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    result = cli(
        "reconstruct", conv_weights, tmp_path / "a.png", "--tile", "64", "-o", tmp_path / "r"
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "r" / "a.png").size == (300, 200)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--tile", "6"], "--tile 6: must be a multiple of the model's downsampling factor 4"),
        (["--tile", "64", "--tile-overlap", "40"], "--tile-overlap 40: must be a multiple of 4"),
        (["--tile-overlap", "8"], "--tile-overlap needs --tile SIZE"),
    ],
)
def test_bad_tiling_is_one_line(tmp_path, cli, conv_weights, options, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    result = cli("reconstruct", conv_weights, tmp_path / "a.png", "-o", tmp_path / "r", *options)
    assert result.exit_code == 2
    assert message in result.output


def test_tiling_needs_a_fully_convolutional_model(tmp_path, cli, tiny_weights):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    result = cli(
        "reconstruct", tiny_weights, tmp_path / "a.png", "-o", tmp_path / "r", "--tile", "64"
    )
    assert result.exit_code == 2
    assert "tiling is for fully convolutional models" in result.output


def test_an_image_too_big_for_memory_is_refused_with_a_hint(tmp_path, monkeypatch):
    import aecli.inference.predictor

    weights = tmp_path / "kl.safetensors"
    save_random(weights, KLLayout(3, 3, (8, 16), 1, 4, norm_groups=8).config())
    predictor = Predictor(weights, "cpu")
    monkeypatch.setattr(aecli.inference.predictor, "available_memory", lambda _device: 100_000_000)
    with pytest.raises(
        Exception, match=r"an image of 2048x2048 would need about .* GB .* pass --tile 512"
    ):
        predictor.reconstruct(torch.zeros(1, 3, 2048, 2048, dtype=torch.uint8))


PEAK = """
import sys, torch
from aecli.inference import Predictor


def peak():  # this process's own high-water mark (ru_maxrss keeps the parent's across exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

predictor = Predictor(sys.argv[1], "cpu")
if sys.argv[2] != "0":
    predictor.set_tiling(int(sys.argv[2]), None, int(sys.argv[3]))
before = peak()
predictor.reconstruct(torch.full((1, 3, 1024, 1024), 128, dtype=torch.uint8))
print(peak() - before)
"""


@pytest.mark.slow
def test_peak_memory_follows_the_tile(tmp_path):
    """A 1024x1024 image through a 32-channel KL-layout model: untiled, the process grows by
    about 710 MB; in tiles of 256 pixels one at a time by less than half of that (about 130 MB),
    and four at a time (the allocator's share varies: 250 to 380 MB) by less than 450 MB
    (README: Large images)."""
    weights = tmp_path / "kl.safetensors"
    save_random(
        weights, KLLayout(3, 3, (32, 32), 1, 4, norm_groups=8, mid_attention=False).config()
    )
    grown = {}
    for tile, at_a_time in (("256", "1"), ("256", "4"), ("0", "0")):
        run = subprocess.run(
            [sys.executable, "-c", PEAK, str(weights), tile, at_a_time],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        grown[f"{tile}x{at_a_time}"] = int(run.stdout.split()[-1])
    assert grown["256x1"] < 0.5 * grown["0x0"], json.dumps(grown)
    assert grown["256x4"] < min(450e6, grown["0x0"]), json.dumps(grown)


def test_tiles_per_batch_are_capped_by_free_memory(tmp_path, monkeypatch):
    import aecli.inference.predictor

    weights = tmp_path / "kl.safetensors"
    save_random(weights, KLLayout(3, 3, (8, 16), 1, 4, norm_groups=8).config())
    predictor = Predictor(weights, "cpu")
    predictor.set_tiling(256, None, 32)
    assert predictor.tile_batch == 32  # the dev machine has room for 32 such tiles
    monkeypatch.setattr(aecli.inference.predictor, "available_memory", lambda _: 60_000_000)
    predictor.set_tiling(256, None, 32)
    assert 1 <= predictor.tile_batch < 32

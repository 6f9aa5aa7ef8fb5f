"""`aecli stats` (per-channel mean and std of a latent folder, against numpy over its shards as
stored) and `aecli export --latent-stats` (the statistics written where each family's
convention keeps them, read back by diffusers and by aecli)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, photos, write_image
from safetensors.numpy import load_file
from typer.testing import CliRunner

from aecli.cli import app
from aecli.io.weights import read_weights_info

diffusers = pytest.importorskip("diffusers")

# the block layouts of tests/test_vae_files.py, test_wan_vae.py and test_flux2_vae.py
KL = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)
SD3 = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
           scaling_factor=1.5305, shift_factor=0.0609)  # fmt: skip
FLUX2 = dict(
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=8,
    sample_size=64,
)
QWEN = dict(base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            latents_mean=[0.0] * 8, latents_std=[1.0] * 8)  # fmt: skip


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def saved(cls, folder: Path, **config) -> Path:
    """A random diffusers VAE at test size, its weights moved off their initial values."""
    torch.manual_seed(0)
    vae = cls(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(folder)
    return folder


def stats_of(folder: Path, *options) -> dict:
    return json.loads(ok("stats", folder, "--json", *options).stdout)


def stored(folder: Path) -> dict[str, list[np.ndarray]]:
    """Every tensor of every shard, as the files hold them (read without aecli)."""
    index = json.loads((folder / "index.json").read_text())
    found: dict[str, list[np.ndarray]] = {}
    for shard in index["shards"]:
        for name, array in load_file(folder / shard["file"]).items():
            found.setdefault(name, []).append(array)
    return found


def per_channel(arrays: list[np.ndarray]) -> np.ndarray:
    """(C, values) in float64 from latents (N, C, H, W) or (N, D) of any spatial sizes."""
    return np.concatenate(
        [np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).astype(np.float64) for a in arrays], 1
    )


def patchify(latents: np.ndarray) -> np.ndarray:
    """diffusers' Flux2Pipeline._patchify_latents (0.42), in numpy."""
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four photos in two sizes (48x64 and 32x48) in turn: at --size native and --shard-size 2,
    four shards of two latent shapes."""
    root = tmp_path_factory.mktemp("images")
    (root / "photos").mkdir()
    for size, names in (((48, 64), "ac"), ((32, 48), "bd")):
        for name, path in zip(names, photos(root / f"{size}", size=size), strict=True):
            path.rename(root / "photos" / f"{name}.png")
    return root / "photos"


@pytest.fixture(scope="module")
def sd(tmp_path_factory, images) -> tuple[Path, Path]:
    """An SD-like AutoencoderKL and its latent folder: --store moments --flip, two shapes, in
    shards of two."""
    root = tmp_path_factory.mktemp("sd")
    vae = saved(diffusers.AutoencoderKL, root / "vae", **KL)
    ok("encode", vae, images, "-o", root / "latents/", "--size", "native", "--shard-size", 2,
       "--store", "moments", "--flip", "--device", "cpu")  # fmt: skip
    return vae, root / "latents"


def test_stats_equal_numpy_over_every_shard_and_shape(sd):
    _, folder = sd
    index = json.loads((folder / "index.json").read_text())
    assert len(index["shards"]) == 4 and len(index["shapes"]) == 2
    values = per_channel(stored(folder)["latents"])
    found = stats_of(folder)
    assert found["images"] == 4 and found["values_per_channel"] == values.shape[1]
    assert found["channels"] == 4
    np.testing.assert_allclose(found["mean"], values.mean(1), rtol=1e-12)
    np.testing.assert_allclose(found["std"], values.std(1), rtol=1e-12)
    overall = found["overall"]
    np.testing.assert_allclose(overall["mean"], values.mean(), rtol=1e-12)
    np.testing.assert_allclose(overall["std"], values.std(), rtol=1e-12)
    np.testing.assert_allclose(overall["rms"], np.sqrt(np.square(values).mean()), rtol=1e-12)
    # the table: a row per channel, its figures as --json has them
    table = ok("stats", folder).stdout
    assert "Per channel" in table and "std of draws" in table
    assert f"{found['mean'][3]:.6g}" in table and f"{found['draw_std'][0]:.6g}" in table
    assert "aecli stats in1k/" in ok("stats", "--help").stdout


def test_moments_give_the_spread_of_posterior_draws_and_flip_adds_the_mirrors(sd):
    """std is that of the posterior means; draw_std, sqrt(var(mean) + mean(std^2)), that of
    draws from the posterior; --flip counts latents_flip (and its std) too."""
    _, folder = sd
    tensors = stored(folder)
    for options, names in (((), ("latents",)), (("--flip",), ("latents", "latents_flip"))):
        means = per_channel([a for n in names for a in tensors[n]])
        stds = per_channel([a for n in names for a in tensors[n + "_std"]])
        found = stats_of(folder, *options)
        assert found["images"] == 4 * len(names)
        np.testing.assert_allclose(found["std"], means.std(1), rtol=1e-12)
        draws = np.sqrt(means.var(1) + np.square(stds).mean(1))
        np.testing.assert_allclose(found["draw_std"], draws, rtol=1e-12)
        overall = np.sqrt(means.var() + np.square(stds).mean())
        np.testing.assert_allclose(found["overall"]["draw_std"], overall, rtol=1e-12)
        assert min(found["draw_std"]) > max(found["std"])  # a tiny KL: a wide posterior


def test_export_gives_an_sd_vae_the_scaling_factor_1_over_std(sd, tmp_path):
    """SD's convention (no shift): scaling_factor = 1 / std over all values, of posterior
    draws for a moments folder; the weights as they were."""
    vae, folder = sd
    found = stats_of(folder)
    result = ok("export", vae, "--latent-stats", folder, "-o", tmp_path / "out", "--json")
    assert "scaling_factor" in result.stderr and "posterior draws" in result.stderr
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out")
    assert again.config.scaling_factor == pytest.approx(1 / found["overall"]["draw_std"], 1e-12)
    assert again.config.shift_factor is None
    written = json.loads(result.stdout)["latent_stats"]["written"]
    assert written == {"scaling_factor": again.config.scaling_factor}
    reference = diffusers.AutoencoderKL.from_pretrained(vae).state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in again.state_dict().items())


def test_export_gives_an_sd3_vae_scale_and_shift_from_scaled_latents(tmp_path, images):
    """SD3's convention: shift_factor = mean, scaling_factor = 1 / std, of raw latents even
    from a folder of --scaled ones; the exported model's scaled latents are then mean 0,
    std 1."""
    vae = saved(diffusers.AutoencoderKL, tmp_path / "vae", **KL, **SD3)
    ok("encode", vae, images, "-o", tmp_path / "raw/", "--size", "native", "--device", "cpu")
    ok("encode", vae, images, "-o", tmp_path / "scaled/", "--size", "native", "--scaled",
       "--device", "cpu")  # fmt: skip
    raw = stats_of(tmp_path / "raw")["overall"]
    unscaled = stats_of(tmp_path / "scaled", "--unscaled")["overall"]
    assert unscaled["std"] == pytest.approx(raw["std"], rel=1e-5)
    ok("export", vae, "--latent-stats", tmp_path / "scaled", "-o", tmp_path / "out")
    config = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").config
    assert config.scaling_factor == pytest.approx(1 / raw["std"], rel=1e-5)
    assert config.shift_factor == pytest.approx(raw["mean"], rel=1e-5)
    ok("encode", tmp_path / "out", images, "-o", tmp_path / "again/", "--size", "native",
       "--scaled", "--device", "cpu")  # fmt: skip
    again = stats_of(tmp_path / "again")["overall"]
    assert again["mean"] == pytest.approx(0, abs=1e-5) and again["std"] == pytest.approx(1, 1e-5)


def test_export_gives_qwen_image_latents_mean_and_std_per_channel(tmp_path, images):
    vae = saved(diffusers.AutoencoderKLQwenImage, tmp_path / "vae", **QWEN)
    ok("encode", vae, images, "-o", tmp_path / "raw/", "--size", "native", "--device", "cpu")
    found = stats_of(tmp_path / "raw")
    ok("export", vae, "--latent-stats", tmp_path / "raw", "-o", tmp_path / "out")
    config = diffusers.AutoencoderKLQwenImage.from_pretrained(tmp_path / "out").config
    np.testing.assert_allclose(config.latents_mean, found["mean"], rtol=1e-12)
    np.testing.assert_allclose(config.latents_std, found["std"], rtol=1e-12)
    # the pipelines' (z - latents_mean) / latents_std: each channel mean 0, std 1
    ok("encode", tmp_path / "out", images, "-o", tmp_path / "again/", "--size", "native",
       "--scaled", "--device", "cpu")  # fmt: skip
    again = stats_of(tmp_path / "again")
    np.testing.assert_allclose(again["mean"], 0, atol=1e-5)
    np.testing.assert_allclose(again["std"], 1, rtol=1e-5)


def test_export_gives_flux2_its_batchnorm_statistics_over_2x2_patches(tmp_path, images):
    """bn.running_mean and running_var per channel of the latents in 2x2 patches, in the
    order of FLUX.2's _patchify_latents, from a folder of --scaled (patched) latents."""
    vae = saved(diffusers.AutoencoderKLFlux2, tmp_path / "vae", **FLUX2)
    ok("encode", vae, images, "-o", tmp_path / "raw/", "--size", "native", "--device", "cpu")
    ok("encode", vae, images, "-o", tmp_path / "scaled/", "--size", "native", "--scaled",
       "--device", "cpu")  # fmt: skip
    patched = per_channel([patchify(a) for a in stored(tmp_path / "raw")["latents"]])
    found = stats_of(tmp_path / "raw", "--patch", "2")
    np.testing.assert_allclose(found["mean"], patched.mean(1), rtol=1e-12)
    np.testing.assert_allclose(found["std"], patched.std(1), rtol=1e-12)
    result = ok("export", vae, "--latent-stats", tmp_path / "scaled", "-o", tmp_path / "out")
    assert "bn.running_mean 32" in result.stderr
    bn = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "out").bn
    np.testing.assert_allclose(bn.running_mean.numpy(), patched.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), patched.var(1), rtol=1e-5)
    ok("encode", tmp_path / "out", images, "-o", tmp_path / "again/", "--size", "native",
       "--scaled", "--device", "cpu")  # fmt: skip
    again = stats_of(tmp_path / "again")  # 32 channels / sqrt(var + eps): std 1 but for eps
    var = patched.var(1)
    np.testing.assert_allclose(again["mean"], 0, atol=1e-4)
    np.testing.assert_allclose(again["std"], np.sqrt(var / (var + 1e-4)), rtol=1e-4)


def test_export_gives_an_aecli_model_the_statistics_sample_draws_from(tmp_path, tiny_weights):
    """A model of aecli's own (a vector latent, classes): count, mean, covariance and per-class
    moments of the folder's latents, by class name, as `aecli sample` reads them."""
    names = read_weights_info(tiny_weights).class_names
    for i in range(6):
        write_image(tmp_path / "data" / names[i % 2] / f"{i}.png", seed=i)
    ok("encode", tiny_weights, tmp_path / "data", "-o", tmp_path / "latents/", "--device", "cpu")
    found = stats_of(tmp_path / "latents")
    out = tmp_path / "out.safetensors"
    ok("export", tiny_weights, "--latent-stats", tmp_path / "latents", "-o", out,
       "--format", "aecli")  # fmt: skip
    written = read_weights_info(out).latent_stats
    tensors = stored(tmp_path / "latents")
    z = per_channel(tensors["latents"])  # (8, 6)
    assert int(written["count"]) == 6
    np.testing.assert_allclose(written["mean"].numpy(), found["mean"], rtol=1e-6)
    np.testing.assert_allclose(written["cov"].numpy(), np.cov(z), rtol=1e-5, atol=1e-7)
    labels = np.concatenate(tensors["labels"])
    for k in range(2):
        mean = z[:, labels == k].mean(1)
        np.testing.assert_allclose(written["class_mean"][k].numpy(), mean, rtol=1e-6)
    assert written["class_count"].tolist() == [3, 3] + [0] * (len(names) - 2)
    ok("sample", out, "-n", 2, "-o", tmp_path / "s.png", "--class", names[1], "--device", "cpu")


def test_what_cannot_take_the_statistics_is_refused_in_one_line(sd, tmp_path, other_weights):
    vae, folder = sd
    out = tmp_path / "o.safetensors"
    result = run("export", other_weights, "--latent-stats", folder, "--format", "aecli", "-o", out)
    line = one_line(result)
    assert result.exit_code == 2 and "other weights" in line and "--force" in line
    assert not out.exists()
    # forced, it still must fit: an 8-dim vector model is no home for 4-channel latents
    result = run("export", other_weights, "--latent-stats", folder, "--force", "--format",
                 "aecli", "-o", out)  # fmt: skip
    assert result.exit_code == 2 and "this model's have 8 dimensions" in one_line(result)
    # and a family whose factors are not its own latents' statistics (TAESD) is refused
    tiny = saved(diffusers.AutoencoderTiny, tmp_path / "taesd",
                 encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                 num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)  # fmt: skip
    result = run("export", tiny, "--latent-stats", folder, "--force", "-o", tmp_path / "t")
    assert result.exit_code == 2 and "AutoencoderTiny" in one_line(result)
    # nor can a single file carry SD's factors: it has no config.json
    result = run("export", vae, "--latent-stats", folder, "--format", "single-file", "-o",
                 tmp_path / "v.safetensors")  # fmt: skip
    assert result.exit_code == 2 and "--format diffusers or aecli" in one_line(result)


def test_a_damaged_shard_is_one_line_naming_it(sd, tmp_path):
    _, folder = sd
    copy = shutil.copytree(folder, tmp_path / "copy")
    shard = json.loads((copy / "index.json").read_text())["shards"][1]["file"]
    data = (copy / shard).read_bytes()
    (copy / shard).write_bytes(data[: len(data) // 2])
    for command in (
        ["stats", copy],
        ["export", sd[0], "--latent-stats", copy, "-o", tmp_path / "o"],
    ):
        result = run(*command)
        assert result.exit_code == 2 and shard in one_line(result)

"""`aecli sample` and `aecli interpolate`: the latent prior, classes, seeds, paths and pipes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AECLI, pixels, read_pngs, shell, write_image
from PIL import Image

from aecli.inference import Predictor
from aecli.inference.generate import (
    _within_class_covariance,
    interpolation_path,
    lerp,
    prior,
    slerp,
    slerp_center,
)
from aecli.io.latents import read_latents
from aecli.io.weights import load_weights, read_weights_info, save_weights

CLASSES = ["circle", "square", "triangle", "ring"]  # the built-in shapes


def tile(sheet: np.ndarray, row: int, column: int, size: int = 64, pad: int = 2) -> np.ndarray:
    """One tile of a sheet written by compose_sheet (16x16 images become 64x64 tiles)."""
    y, x = pad + row * (size + pad), pad + column * (size + pad)
    return sheet[y : y + size, x : x + size]


def enlarged(image: np.ndarray, factor: int = 4) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


@pytest.fixture
def ends(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "in" / "a.png", tmp_path / "in" / "b.png"
    write_image(a, seed=1)
    write_image(b, seed=2)
    return a, b


# -- sample ----------------------------------------------------------------------------------


def test_sample_grid_shows_the_decoded_latents(tmp_path, tiny_weights, cli):
    grid, z = tmp_path / "grid.png", tmp_path / "z.safetensors"
    result = cli(
        "sample", tiny_weights, "-n", 5, "--seed", 1, "-o", grid, "--latents-out", z,
        "--columns", 3, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["seed"] == 1 and summary["latent_shape"] == [8]
    assert "training latents" in summary["distribution"]

    latents = read_latents(z)
    assert latents.latents.shape == (5, 8)
    assert latents.fingerprint == read_weights_info(tiny_weights).fingerprint
    assert latents.sources == [f"sample-00000{i}" for i in range(5)] and latents.labels is None

    sheet = pixels(grid)
    assert sheet.shape == (2 + 2 * 66, 2 + 3 * 66, 3)  # 2 rows of 3 tiles, 64 px + 2 px padding
    assert cli("decode", tiny_weights, z, "-o", tmp_path / "dec").exit_code == 0
    decoded = read_pngs(tmp_path / "dec")
    assert sorted(decoded) == [f"sample-00000{i}.png" for i in range(5)]
    for i in range(5):
        assert np.array_equal(tile(sheet, i // 3, i % 3), enlarged(decoded[f"sample-00000{i}.png"]))
    assert (tile(sheet, 1, 2) == 255).all()  # the sixth place stays empty


def test_sample_spatial_latents_at_another_size(tmp_path, conv_weights, cli):
    z = tmp_path / "z.npy"
    result = cli("sample", conv_weights, "-n", 3, "--seed", 0, "--latents-out", z)
    assert result.exit_code == 0, result.output
    assert np.load(z).shape == (3, 2, 4, 4)  # the training size, 16x16, by default

    out = tmp_path / "big"
    result = cli(
        "sample", conv_weights, "-n", 3, "--size", "24x32", "-o", out, "--latents-out", z,
        "--overwrite",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.load(z).shape == (3, 2, 6, 8)
    images = read_pngs(out)
    assert sorted(images) == ["sample-000000.png", "sample-000001.png", "sample-000002.png"]
    assert all(image.shape == (24, 32, 3) for image in images.values())

    result = cli("sample", conv_weights, "--size", "10x16", "-o", tmp_path / "x.png")
    assert (
        result.exit_code == 2 and "multiple of the model's downsampling factor 4" in result.stderr
    )
    result = cli("sample", conv_weights, "--size", "big", "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "not a size" in result.stderr


def test_sample_size_is_refused_for_vector_latents(tmp_path, tiny_weights, cli):
    result = cli("sample", tiny_weights, "--size", "32x32", "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "vector latent" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("model", ["tiny_weights", "conv_weights"])
def test_class_samples_follow_their_class_gaussian(tmp_path, cli, request, model):
    weights = request.getfixturevalue(model)
    stats = read_weights_info(weights).latent_stats
    # (K, D) and (K, D, D): over the latent's dims, or its channels when spatial
    class_means, class_covs = stats["class_mean"], stats["class_cov"]
    for k, name in enumerate(CLASSES):
        z = tmp_path / f"{name}.safetensors"
        result = cli("sample", weights, "-n", 400, "--class", name, "--seed", k, "--latents-out", z)
        assert result.exit_code == 0, result.output
        latents = read_latents(z)
        assert latents.labels.tolist() == [k] * 400 and latents.class_names == CLASSES
        values = latents.latents.double()
        if values.ndim == 4:  # (N, C, H, W): every position is a draw over the channels
            values = values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])
        mean, spread = values.mean(0), class_covs[k].diagonal().double().sqrt()
        assert ((mean - class_means[k]).abs() < 4 * spread / len(values) ** 0.5 + 1e-6).all()
        assert torch.allclose(values.std(0), spread, rtol=0.2, atol=1e-6)
        if model == "tiny_weights":  # vector latents: the classes' means lie apart
            distances = (class_means - mean.float()).norm(dim=1)
            assert distances.argmin() == k, distances


def test_seed_gives_identical_bytes_run_to_run(tmp_path, tiny_weights, cli):
    def run(name: str, seed: int) -> tuple[bytes, bytes]:
        grid, z = tmp_path / f"{name}.png", tmp_path / f"{name}.safetensors"
        args = ["sample", tiny_weights, "-n", 6, "--seed", seed, "-o", grid, "--latents-out", z]
        assert cli(*args).exit_code == 0
        return grid.read_bytes(), z.read_bytes()

    again = tmp_path / "again.png"
    command = f'{AECLI} sample "{tiny_weights}" -n 6 --seed 11 -o "{again}"'  # another process
    assert shell(command).returncode == 0
    first = run("first", 11)
    assert first == run("second", 11)
    assert first[0] == again.read_bytes()
    assert first[0] != run("other", 12)[0]


def test_without_a_seed_the_random_one_is_printed(tmp_path, tiny_weights, cli):
    result = cli("sample", tiny_weights, "-n", 2, "-o", tmp_path / "a.png")
    assert result.exit_code == 0
    seed = result.stderr.split("seed ")[1].split(")")[0]
    again = cli("sample", tiny_weights, "-n", 2, "--seed", seed, "-o", tmp_path / "b.png")
    assert again.exit_code == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_class_by_index_and_unknown_class(tmp_path, tiny_weights, cli):
    by_name, by_index = tmp_path / "name.npy", tmp_path / "index.npy"
    assert cli("sample", tiny_weights, "--class", "square", "--latents-out", by_name).exit_code == 0
    assert cli("sample", tiny_weights, "--class", "1", "--latents-out", by_index).exit_code == 0
    assert read_latents(by_name).latents.shape == read_latents(by_index).latents.shape

    result = cli("sample", tiny_weights, "--class", "hexagon", "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--class hexagon: not a class of this model" in result.stderr
    assert "circle (0), square (1), triangle (2), ring (3)" in result.stderr
    assert not (tmp_path / "x.png").exists()
    result = cli("sample", tiny_weights, "--class", "4", "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "not a class" in result.stderr


def test_temperature_zero_gives_the_mean(tmp_path, tiny_weights, conv_weights, cli):
    stats = read_weights_info(tiny_weights).latent_stats
    cases = [
        (tiny_weights, [], stats["mean"]),
        (tiny_weights, ["--class", "ring"], stats["class_mean"][3]),
        (conv_weights, [], torch.zeros(2, 4, 4)),  # the VAE prior's mean
    ]
    for i, (weights, options, mean) in enumerate(cases):
        z, out = tmp_path / f"z{i}.npy", tmp_path / f"out{i}"
        args = ["sample", weights, "-n", 3, "--temperature", 0, "--latents-out", z, "-o", out]
        assert cli(*args, *options).exit_code == 0
        latents = torch.from_numpy(np.load(z))
        assert torch.equal(latents, mean.expand_as(latents))
        images = list(read_pngs(out).values())
        assert len(images) == 3 and all(np.array_equal(images[0], im) for im in images)
    result = cli("sample", tiny_weights, "--temperature", "-1", "-o", tmp_path / "x.png")
    assert result.exit_code == 2


def test_sample_needs_an_output_and_training_statistics(tmp_path, tiny_weights, cli):
    result = cli("sample", tiny_weights, "-n", 2)
    assert result.exit_code == 2 and "nothing to do" in result.stderr
    result = cli("sample", tiny_weights, "--latents-out", "-", "--json")
    assert result.exit_code == 2 and "--json" in result.stderr

    model, info = load_weights(tiny_weights)  # as saved by a checkpoint before training ended
    unfinished = tmp_path / "unfinished.safetensors"
    save_weights(
        unfinished, model, info.config, preset="tiny", data={}, class_names=None, metrics={}
    )
    result = cli("sample", unfinished, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "no latent statistics" in result.stderr
    result = cli("sample", unfinished, "--class", "circle", "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "had no labels" in result.stderr


# -- interpolate -----------------------------------------------------------------------------


def test_interpolation_ends_are_the_reconstructions(ends, tmp_path, tiny_weights, cli):
    a, b = ends
    frames = tmp_path / "frames"
    result = cli("interpolate", tiny_weights, a, b, "--steps", 5, "-o", frames, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["latent_distance"] > 0
    images = read_pngs(frames)
    assert sorted(images) == [f"step-{i}.png" for i in range(5)]
    assert cli("reconstruct", tiny_weights, a, b, "-o", tmp_path / "rec").exit_code == 0
    recon = read_pngs(tmp_path / "rec")
    for step, name in ((0, "a.png"), (4, "b.png")):
        assert np.abs(images[f"step-{step}.png"].astype(int) - recon[name]).max() <= 1
    assert not np.array_equal(images["step-2.png"], images["step-0.png"])

    strip = tmp_path / "strip.png"
    assert cli("interpolate", tiny_weights, a, b, "--steps", 5, "-o", strip).exit_code == 0
    sheet = pixels(strip)
    assert sheet.shape == (2 + 66, 2 + 5 * 66, 3)  # one row, A on the left
    for i in range(5):
        assert np.array_equal(tile(sheet, 0, i), enlarged(images[f"step-{i}.png"]))

    # A latent file holding A's latent is the same start as the image A.
    za = tmp_path / "a.safetensors"
    assert cli("encode", tiny_weights, a, "-o", za).exit_code == 0
    again = tmp_path / "again"
    assert cli("interpolate", tiny_weights, za, b, "--steps", 5, "-o", again).exit_code == 0
    assert read_pngs(again).keys() == images.keys()
    for name, image in read_pngs(again).items():
        assert np.abs(image.astype(int) - images[name]).max() <= 1


def test_vae_interpolates_between_posterior_means(ends, tmp_path, conv_weights, cli):
    a, b = ends
    path = tmp_path / "path"
    assert cli("interpolate", conv_weights, a, b, "--steps", 3, "-o", path).exit_code == 0
    z = tmp_path / "z.npy"
    assert cli("encode", conv_weights, a, b, "-o", z).exit_code == 0  # posterior means
    decoded = tmp_path / "dec"
    assert cli("decode", conv_weights, z, "-o", decoded).exit_code == 0
    frames, ends_decoded = read_pngs(path), read_pngs(decoded)
    assert np.abs(frames["step-0.png"].astype(int) - ends_decoded["000000.png"]).max() <= 1
    assert np.abs(frames["step-2.png"].astype(int) - ends_decoded["000001.png"]).max() <= 1


def test_slerp_and_lerp_share_their_ends_and_differ_between():
    a = torch.tensor([3.0, 0.0, 0.0])
    b = torch.tensor([0.0, 3.0, 0.0])
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    straight, round_ = lerp(a, b, t), slerp(a, b, t)
    assert torch.allclose(round_[[0, -1]], straight[[0, -1]])
    # slerp keeps the length of equal-length ends; the straight line cuts through the middle
    assert torch.allclose(round_.norm(dim=1), torch.full((5,), 3.0))
    assert straight[2].norm() < 2.2
    assert torch.allclose(round_[2], torch.tensor([1.0, 1.0, 0.0]) * 3 / 2**0.5)
    # the angle is swept evenly
    cosines = (round_[1:] * round_[:-1]).sum(1) / 9
    assert torch.allclose(cosines, cosines[0].expand(4), atol=1e-6)
    # parallel ends (no great circle) and a centre: slerp turns around the centre
    assert torch.allclose(slerp(a, 2 * a, t), lerp(a, 2 * a, t))
    centre = torch.tensor([1.0, 1.0, 1.0])
    shifted = slerp(a + centre, b + centre, t, center=centre)
    assert torch.allclose(shifted - centre, round_, atol=1e-6)
    # the path always ends exactly at its ends, for spatial latents too
    za, zb = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    path = interpolation_path(za, zb, 7, "slerp")
    assert path.shape == (7, 2, 4, 4) and torch.equal(path[0], za) and torch.equal(path[-1], zb)


def test_slerp_differs_from_lerp_on_a_real_model(ends, tmp_path, tiny_weights, conv_weights, cli):
    a, b = ends
    runs = {}
    for mode in ("lerp", "slerp"):
        out = tmp_path / mode
        result = cli("interpolate", tiny_weights, a, b, "--steps", 5, "--mode", mode, "-o", out)
        assert result.exit_code == 0, result.output
        runs[mode] = read_pngs(out)
    for end in ("step-0.png", "step-4.png"):
        assert np.array_equal(runs["lerp"][end], runs["slerp"][end])
    assert not np.array_equal(runs["lerp"]["step-2.png"], runs["slerp"]["step-2.png"])
    # slerp turns around the prior's mean: the training latents' mean for a plain autoencoder
    mean = read_weights_info(tiny_weights).latent_stats["mean"]
    assert torch.equal(slerp_center(Predictor(tiny_weights, "cpu")), mean)
    assert slerp_center(Predictor(conv_weights, "cpu")) is None  # the VAE's: the origin


def test_gif_has_one_frame_per_step_and_loops(ends, tmp_path, tiny_weights, cli):
    a, b = ends
    gif = tmp_path / "morph.gif"
    args = ["interpolate", tiny_weights, a, b, "--steps", 6, "-o", tmp_path / "s.png"]
    assert cli(*args, "--gif", gif, "--fps", 5).exit_code == 0
    with Image.open(gif) as animation:
        assert animation.n_frames == 6 and animation.is_animated
        assert animation.info["loop"] == 0 and animation.info["duration"] == 200
        assert animation.size == (128, 128)  # 16 px frames enlarged 8x
        animation.seek(5)
        last = np.asarray(animation.convert("RGB"))
    strip = pixels(tmp_path / "s.png")
    end = tile(strip, 0, 5)[::4, ::4].astype(int)  # the strip's B, at 16 px
    assert np.abs(last[::8, ::8].astype(int) - end).mean() < 8  # a 256-colour palette


def test_interpolate_refuses_bad_ends(ends, tmp_path, tiny_weights, conv_weights, cli):
    a, b = ends
    out = tmp_path / "x.png"
    many = tmp_path / "many.safetensors"
    assert cli("encode", tiny_weights, a, b, "-o", many).exit_code == 0
    result = cli("interpolate", tiny_weights, many, b, "-o", out)
    assert result.exit_code == 2 and "holds 2 latents" in result.stderr

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = cli("interpolate", tiny_weights, text, b, "-o", out)
    assert result.exit_code == 2 and "notes.txt: not an image" in result.stderr
    result = cli("interpolate", tiny_weights, tmp_path / "nope.png", b, "-o", out)
    assert result.exit_code == 2 and "file not found" in result.stderr

    z = tmp_path / "conv.safetensors"
    assert cli("encode", conv_weights, a, "-o", z).exit_code == 0
    result = cli("interpolate", tiny_weights, z, b, "-o", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    result = cli("interpolate", tiny_weights, a, b, "-o", a)
    assert result.exit_code == 2 and "is one of this command's inputs" in result.stderr
    assert not out.exists() and "Traceback" not in result.output


# -- pipelines -------------------------------------------------------------------------------


def test_shell_pipe_sample_to_decode(tmp_path, tiny_weights, cli):
    out = tmp_path / "out"
    command = (
        f'{AECLI} sample "{tiny_weights}" -n 8 --seed 5 --latents-out - '
        f'| {AECLI} decode "{tiny_weights}" - -o "{out}"'
    )
    done = shell(command)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    piped = read_pngs(out)
    assert sorted(piped) == [f"sample-00000{i}.png" for i in range(8)]
    direct = tmp_path / "direct"
    assert cli("sample", tiny_weights, "-n", 8, "--seed", 5, "-o", direct).exit_code == 0
    for name, image in read_pngs(direct).items():
        assert np.array_equal(image, piped[name])


def test_shell_pipe_sample_into_interpolate(ends, tmp_path, tiny_weights, cli):
    a, _ = ends
    strip = tmp_path / "strip"
    done = shell(
        f'{AECLI} sample "{tiny_weights}" -n 1 --seed 2 --latents-out - '
        f'| {AECLI} interpolate "{tiny_weights}" - "{a}" --steps 3 -o "{strip}"'
    )
    assert done.returncode == 0, done.stderr
    frames = read_pngs(strip)
    single = tmp_path / "one"
    assert cli("sample", tiny_weights, "-n", 1, "--seed", 2, "-o", single).exit_code == 0
    assert np.array_equal(frames["step-0.png"], read_pngs(single)["sample-000000.png"])


def test_shell_pipe_edits_a_latent_file_in_python(ends, tmp_path, tiny_weights):
    """encode | python (aecli's latent-file reader and writer, numpy in between) | decode: the
    file keeps its fingerprint, so decode needs no --force."""
    a, b = ends
    edit = (
        "from aecli.io.latents import read_latents, write_latents; "
        "lf = read_latents('-'); z = lf.latents.numpy(); "
        "lf.latents = __import__('torch').from_numpy(z[:1] + 0.5 * (z[1:] - z[:1])); "
        "lf.sources = ['halfway']; write_latents('-', lf)"
    )
    out = tmp_path / "out"
    command = (
        f'{AECLI} encode "{tiny_weights}" "{a}" "{b}" -o - '
        f'| "{sys.executable}" -c "{edit}" '
        f'| {AECLI} decode "{tiny_weights}" - -o "{out}"'
    )
    done = shell(command)
    assert done.returncode == 0, done.stderr
    assert "another model" not in done.stderr
    halfway = read_pngs(out)["halfway.png"]
    middle = tmp_path / "middle"
    runner = shell(f'{AECLI} interpolate "{tiny_weights}" "{a}" "{b}" --steps 3 -o "{middle}"')
    assert runner.returncode == 0, runner.stderr
    assert np.abs(halfway.astype(int) - read_pngs(middle)["step-1.png"]).max() <= 1


def test_pooled_within_class_covariance_when_class_covariances_were_not_stored(tiny_weights):
    """Many classes x a large latent: training stores no per-class covariance, and a class is
    sampled with the covariance of every latent around its own class's mean."""
    rng = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(torch.tensor([50, 80, 70]))
    z = torch.randn(200, 4, generator=rng, dtype=torch.float64) + 3.0 * labels[:, None]
    class_means = torch.stack([z[labels == k].mean(0) for k in range(3)])
    stats = {
        "count": torch.tensor(200.0),
        "mean": z.mean(0),
        "cov": torch.cov(z.T),
        "class_count": torch.tensor([50.0, 80.0, 70.0]),
        "class_mean": class_means,
    }
    centred = z - class_means[labels]
    expected = centred.T @ centred / 199
    assert torch.allclose(_within_class_covariance(stats), expected, atol=1e-10)

    predictor = Predictor(tiny_weights, "cpu")
    del predictor.info.latent_stats["class_cov"]
    stored = predictor.info.latent_stats
    gaussian = prior(predictor, 2)
    assert torch.equal(gaussian.mean, stored["class_mean"][2].double())
    pooled = _within_class_covariance(stored)
    assert torch.allclose(gaussian.factor @ gaussian.factor.T, pooled, atol=1e-5)

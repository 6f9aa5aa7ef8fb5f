"""Latent files, `aecli encode` and `aecli decode`: round trips, .npy, shell pipes, refusals."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AECLI, read_pngs, shell, write_image
from PIL import Image

from aecli.io.latents import LatentFile, LatentFileError, latent_bytes, read_latents
from aecli.io.weights import read_weights_info


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i, name in enumerate(["cats/a.png", "cats/b.png", "dogs/c.png", "dogs/d.jpg"]):
        write_image(root / name, seed=i)
    return root


def test_encode_decode_round_trip_through_a_file(photos, tmp_path, tiny_weights, cli):
    z = tmp_path / "z.safetensors"
    result = cli("encode", tiny_weights, photos, "-o", z, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["latent_shape"] == [8]

    latents = read_latents(z)
    assert latents.latents.shape == (4, 8)
    assert latents.fingerprint == read_weights_info(tiny_weights).fingerprint
    assert latents.sources == ["cats/a.png", "cats/b.png", "dogs/c.png", "dogs/d.jpg"]
    assert latents.labels.tolist() == [0, 0, 1, 1] and latents.class_names == ["cats", "dogs"]

    assert cli("decode", tiny_weights, z, "-o", tmp_path / "dec").exit_code == 0
    assert cli("reconstruct", tiny_weights, photos, "-o", tmp_path / "rec").exit_code == 0
    images, reference = read_pngs(tmp_path / "dec"), read_pngs(tmp_path / "rec")
    assert sorted(images) == ["cats/a.png", "cats/b.png", "dogs/c.png", "dogs/d.png"]
    for name, image in images.items():  # decode(encode(x)) is the reconstruction
        assert np.abs(image.astype(int) - reference[name]).max() <= 1

    grid = tmp_path / "grid.png"
    assert cli("decode", tiny_weights, z, "-o", grid, "--columns", "2").exit_code == 0
    assert Image.open(grid).size == (2 + 2 * 66, 2 + 2 * 66)


def test_npy_out_and_in(photos, tmp_path, tiny_weights, cli):
    z, npy = tmp_path / "z.safetensors", tmp_path / "z.npy"
    assert cli("encode", tiny_weights, photos, "-o", z).exit_code == 0
    assert cli("encode", tiny_weights, photos, "-o", npy).exit_code == 0
    array = np.load(npy, allow_pickle=False)
    assert array.dtype == np.float32
    assert np.array_equal(array, read_latents(z).latents.numpy())
    result = cli("decode", tiny_weights, npy, "-o", tmp_path / "dec")
    assert result.exit_code == 0, result.output
    assert sorted(read_pngs(tmp_path / "dec")) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "000003.png",
    ]


def test_encode_sample_draws_from_a_vae_posterior(
    photos, tmp_path, conv_weights, tiny_weights, cli
):
    mean, draw, again = (tmp_path / f"{n}.npy" for n in ("mean", "draw", "again"))
    assert cli("encode", conv_weights, photos, "-o", mean).exit_code == 0
    assert cli("encode", conv_weights, photos, "-o", draw, "--sample", "--seed", "3").exit_code == 0
    assert (
        cli("encode", conv_weights, photos, "-o", again, "--sample", "--seed", "3").exit_code == 0
    )
    assert np.load(mean).shape == (4, 2, 4, 4)
    assert not np.allclose(np.load(mean), np.load(draw))
    assert np.array_equal(np.load(draw), np.load(again))
    result = cli("encode", tiny_weights, photos, "-o", tmp_path / "x.npy", "--sample")
    assert result.exit_code == 2 and "plain autoencoder" in result.stderr


def test_latents_from_another_model_are_refused_unless_forced(
    photos, tmp_path, tiny_weights, other_weights, cli
):
    z = tmp_path / "z.safetensors"
    assert cli("encode", tiny_weights, photos, "-o", z).exit_code == 0
    result = cli("decode", other_weights, z, "-o", tmp_path / "dec")
    assert result.exit_code == 2 and "Traceback" not in result.output
    mine = read_weights_info(tiny_weights).fingerprint
    theirs = read_weights_info(other_weights).fingerprint
    assert mine in result.stderr and theirs in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "dec").exists()
    result = cli("decode", other_weights, z, "-o", tmp_path / "dec", "--force")
    assert result.exit_code == 0 and len(read_pngs(tmp_path / "dec")) == 4


def test_fingerprint_names_the_weights_whatever_the_threads(monkeypatch):
    """Hashed on every core, the fingerprint is the same with one thread; a single value, a
    name or a shape changed gives another."""
    import aecli.io.weights as weights

    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 32, 3, 3) for i in range(6)}
    tensors["empty"] = torch.zeros(0)
    print_ = weights.fingerprint(tensors)
    monkeypatch.setattr(weights.os, "cpu_count", lambda: 1)
    assert weights.fingerprint(tensors) == print_
    changed = {**tensors, "layer3.weight": tensors["layer3.weight"].clone()}
    changed["layer3.weight"][5, 4, 1, 2] += 1e-3
    renamed = {("layer9.weight" if k == "layer0.weight" else k): v for k, v in tensors.items()}
    reshaped = {**tensors, "layer2.weight": tensors["layer2.weight"].reshape(32, 64, 3, 3)}
    prints = {weights.fingerprint(t) for t in (changed, renamed, reshaped)}
    assert len(prints) == 3 and print_ not in prints


def test_wrong_latent_shape_is_one_line_with_both_shapes(tmp_path, tiny_weights, conv_weights, cli):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5), np.float32))
    result = cli("decode", tiny_weights, bad, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "latent shape (3, 5) does not fit the model: expected (N, 8)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # a fully convolutional model decodes any spatial size with its channel count
    np.save(bad, np.zeros((2, 2, 6, 3), np.float32))
    result = cli("decode", conv_weights, bad, "-o", tmp_path / "conv")
    assert result.exit_code == 0 and np.asarray(
        Image.open(tmp_path / "conv" / "000000.png")
    ).shape == (24, 12, 3)
    np.save(bad, np.zeros((2, 3, 4, 4), np.float32))
    result = cli("decode", conv_weights, bad, "-o", tmp_path / "conv2")
    assert result.exit_code == 2 and "expected (N, 2, H, W)" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"hello, world", "neither safetensors nor .npy"),
        (None, "not an aecli latent file"),
    ],
)
def test_unreadable_latent_files_are_one_line(tmp_path, tiny_weights, cli, content, message):
    path = tmp_path / "z.safetensors"
    if content is None:
        path.write_bytes(tiny_weights.read_bytes())  # a weights file, not latents
    else:
        path.write_bytes(content)
    result = cli("decode", tiny_weights, path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.stderr
    assert str(path) in result.stderr and "Traceback" not in result.output


def test_latent_bytes_round_trip_and_reject_non_finite(tmp_path):
    latents = LatentFile(
        torch.randn(3, 4), torch.tensor([0, 1, 1]), "abc", ["a", "b", "c"], ["x", "y"]
    )
    path = tmp_path / "z.safetensors"
    path.write_bytes(latent_bytes(latents))
    back = read_latents(path)
    assert torch.equal(back.latents, latents.latents) and torch.equal(back.labels, latents.labels)
    assert (back.fingerprint, back.sources, back.class_names) == (
        "abc",
        ["a", "b", "c"],
        ["x", "y"],
    )
    buffer = io.BytesIO()
    np.save(buffer, np.array([[1.0, np.nan]], np.float32))
    path.write_bytes(buffer.getvalue())
    with pytest.raises(LatentFileError, match="non-finite"):
        read_latents(path)


def test_shell_pipe_encode_to_decode(photos, tmp_path, tiny_weights):
    out = tmp_path / "out"
    command = (
        f'{AECLI} encode "{tiny_weights}" "{photos / "cats" / "a.png"}" -o - '
        f'| {AECLI} decode "{tiny_weights}" - -o "{out}"'
    )
    done = shell(command)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # stdout carried only the latent file between the two commands
    assert sorted(read_pngs(out)) == ["a.png"]


def test_shell_pipe_through_a_numpy_transform(photos, tmp_path, tiny_weights, cli):
    transform = (
        "import io, sys, numpy as np; "
        "z = np.load(io.BytesIO(sys.stdin.buffer.read())); "
        "np.save(sys.stdout.buffer, np.repeat(z.mean(axis=0, keepdims=True), 3, axis=0))"
    )
    out = tmp_path / "out"
    command = (
        f'{AECLI} encode "{tiny_weights}" "{photos}" --format npy -o - '
        f'| "{sys.executable}" -c "{transform}" '
        f'| {AECLI} decode "{tiny_weights}" - -o "{out}"'
    )
    done = shell(command)
    assert done.returncode == 0, done.stderr
    images = read_pngs(out)
    assert sorted(images) == ["000000.png", "000001.png", "000002.png"]
    assert np.array_equal(images["000000.png"], images["000002.png"])  # three copies of the mean


def test_source_names_that_cannot_name_a_file_fall_back_to_numbers():
    """Names from a latent file's metadata (anyone may have written them) become file names
    only where every one can: none empty, no NUL, no part longer than a file system takes."""
    from aecli.inference.outputs import decoded_names

    assert decoded_names(["cats/a.jpg", "b.jpg"], 2) == ["cats/a.png", "b.png"]
    for hostile in (["", "b.jpg"], ["[" * 5000, "b.jpg"], ["a\0.jpg", "b.jpg"], [".", "b"]):
        assert decoded_names(hostile, 2) == ["000000.png", "000001.png"]

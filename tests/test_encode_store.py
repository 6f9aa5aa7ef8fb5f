"""What `aecli encode` stores for a diffusion trainer: the posterior's moments (--store), each
image's mirror image (--flip), in a storage dtype (--dtype), computed in float32; and what
`decode` and `info` make of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, photos, read_pngs
from PIL import Image

from aecli.io.latents import read_latents

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    """A small random diffusers AutoencoderKL with scaling_factor 0.5 (so that --scaled moves
    the latents), every weight moved off its initial value."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        layers_per_block=1,
        norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        scaling_factor=0.5,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """Four photo crops in two class folders, and the same files mirrored left to right (same
    names) in another folder."""
    root = tmp_path_factory.mktemp("images")
    for name, size in (("a", (48, 64)), ("b", (32, 48))):
        photos(root / "photos" / name, size)
    for path in sorted((root / "photos").rglob("*.png")):
        mirrored = root / "mirrored" / path.relative_to(root / "photos")
        mirrored.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    return root / "photos", root / "mirrored"


def shards(folder: Path) -> list:
    """The latent files of a folder, in the index's order."""
    index = json.loads((folder / "index.json").read_text())
    return [read_latents(folder / entry["file"]) for entry in index["shards"]]


def by_source(files) -> dict[str, dict[str, torch.Tensor]]:
    """{source: {tensor name: its latent}} over latent files."""
    found = {}
    for latents in files:
        for row, source in enumerate(latents.sources):
            found[source] = {name: t[row] for name, t in latents.stored().items()}
    return found


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def test_moments_flips_and_bfloat16_are_the_float32_encode_rounded(cli, vae, images, tmp_path):
    """--flip --store moments --dtype bfloat16 into a folder: the stored means are a plain
    float32 encode rounded to bfloat16, the mirror images' latents are the encode of the
    mirrored files, the standard deviations are diffusers' posterior's, positive."""
    photos_dir, mirrored_dir = images
    out = tmp_path / "lf"
    args = ["--size", "native", "--shard-size", "2"]
    result = cli("encode", vae, photos_dir, "-o", out, *args, "--flip", "--store", "moments",
                 "--dtype", "bfloat16")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "posterior mean and std, with mirror images, bfloat16" in result.stderr
    plain, mirrored = tmp_path / "plain", tmp_path / "mirrored"
    assert cli("encode", vae, photos_dir, "-o", plain, *args).exit_code == 0
    assert cli("encode", vae, mirrored_dir, "-o", mirrored, *args).exit_code == 0

    index = json.loads((out / "index.json").read_text())
    assert index["settings"]["store"] == "moments" and index["settings"]["flip"] is True
    assert (index["settings"]["dtype"], index["settings"]["precision"]) == ("bfloat16", "fp32")
    stored, means, flips = (
        by_source(shards(out)),
        by_source(shards(plain)),
        by_source(shards(mirrored)),
    )
    assert sorted(stored) == sorted(means) and len(stored) == 4
    reference = diffusers.AutoencoderKL.from_pretrained(vae).eval()
    for source, tensors in stored.items():
        assert set(tensors) == {"latents", "latents_std", "latents_flip", "latents_flip_std"}
        assert torch.equal(tensors["latents"], bf16(means[source]["latents"])), source
        assert torch.equal(tensors["latents_flip"], bf16(flips[source]["latents"])), source
        assert (tensors["latents_std"] > 0).all() and (tensors["latents_flip_std"] > 0).all()
        image = np.asarray(Image.open(photos_dir / source), dtype=np.float32)
        x = torch.from_numpy(image).permute(2, 0, 1)[None] / 127.5 - 1
        with torch.no_grad():
            std = reference.encode(x).latent_dist.std[0]
        assert torch.allclose(tensors["latents_std"], std, rtol=1 / 128, atol=1e-6), source
    # the shards are bfloat16 on disk: half the bytes of the float32 folder's four tensors
    sizes = [sum(e["bytes"] for e in json.loads((f / "index.json").read_text())["shards"])
             for f in (out, plain)]  # fmt: skip
    assert sizes[0] < 2.2 * sizes[1]


def test_scaled_moments_scale_the_spread_by_the_scale_alone(cli, vae, images, tmp_path):
    photos_dir, _ = images
    out, scaled = tmp_path / "z.safetensors", tmp_path / "s.safetensors"
    common = ["--size", "48x64", "--store", "moments"]
    assert cli("encode", vae, photos_dir / "a", "-o", out, *common).exit_code == 0
    assert cli("encode", vae, photos_dir / "a", "-o", scaled, *common, "--scaled").exit_code == 0
    raw, done = read_latents(out), read_latents(scaled)
    assert done.scaling is not None and done.scaling.scale == 0.5
    assert torch.allclose(done.latents, raw.latents * 0.5, atol=1e-6)
    assert torch.allclose(done.std, raw.std * 0.5, atol=1e-6)


def test_store_sample_is_the_sample_flag_and_differs_from_the_mean(cli, vae, images, tmp_path):
    photos_dir, _ = images
    files = [tmp_path / f"{n}.safetensors" for n in ("mean", "store", "flag")]
    common = ["--size", "48x64", "--seed", "3"]
    assert cli("encode", vae, photos_dir / "a", "-o", files[0], *common).exit_code == 0
    assert cli("encode", vae, photos_dir / "a", "-o", files[1], *common, "--store", "sample",
               "--flip").exit_code == 0  # fmt: skip
    assert cli("encode", vae, photos_dir / "a", "-o", files[2], *common, "--sample").exit_code == 0
    mean, store, flag = (read_latents(f) for f in files)
    assert torch.equal(store.latents, flag.latents)
    assert not torch.allclose(store.latents, mean.latents)
    assert store.flip is not None and store.std is None
    result = cli("encode", vae, photos_dir / "a", "-o", files[0], "--sample", "--store",
                 "moments", "--overwrite")  # fmt: skip
    assert result.exit_code == 2 and "--sample is --store sample" in one_line(result)


def test_a_deterministic_model_refuses_sample_and_moments(cli, tiny_weights, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    for store in ("moments", "sample"):
        result = cli("encode", tiny_weights, image, "-o", tmp_path / "z.safetensors", "--store",
                     store)  # fmt: skip
        line = one_line(result)
        assert result.exit_code == 2 and f"--store {store}" in line and "posterior" in line
        assert not (tmp_path / "z.safetensors").exists()


def test_float16_beyond_its_range_is_refused_naming_the_image(cli, vae, images, tmp_path):
    """Latents past float16's largest value are refused naming the image, never stored as
    infinities; float16 within range rounds as numpy does, and .npy can hold it."""
    photos_dir, _ = images
    loud = tmp_path / "loud"
    model = diffusers.AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        model.quant_conv.bias.add_(1e5)  # every latent mean past 65504
    model.save_pretrained(loud)
    out = tmp_path / "z.safetensors"
    result = cli("encode", loud, photos_dir / "a", "-o", out, "--size", "48x64", "--dtype",
                 "float16")  # fmt: skip
    line = one_line(result)
    assert result.exit_code == 2 and "photo0.png" in line and "float16" in line
    assert "bfloat16" in line and not out.exists()
    assert cli("encode", loud, photos_dir / "a", "-o", out, "--size", "48x64", "--dtype",
               "bfloat16").exit_code == 0  # fmt: skip
    assert torch.isfinite(read_latents(out).latents).all()

    half, full = tmp_path / "h.npy", tmp_path / "f.safetensors"
    assert cli("encode", vae, photos_dir / "a", "-o", half, "--size", "48x64", "--dtype",
               "float16").exit_code == 0  # fmt: skip
    assert cli("encode", vae, photos_dir / "a", "-o", full, "--size", "48x64").exit_code == 0
    stored = np.load(half)
    assert stored.dtype == np.float16
    assert np.array_equal(stored, read_latents(full).latents.numpy().astype(np.float16))


@pytest.mark.parametrize(
    "options, message",
    [
        (["--flip"], "--flip store more arrays"),
        (["--store", "moments"], "--store moments store more arrays"),
        (["--dtype", "bfloat16"], "numpy has no bfloat16"),
        (["--dtype", "float64"], "--dtype float64: choose float32, bfloat16, float16"),
        (["--store", "median"], "--store median: choose mean, sample, moments"),
        (["--precision", "fp8"], "--precision fp8: choose fp32, bf16, auto"),
    ],
)
def test_what_a_file_cannot_store_is_one_line(cli, vae, images, tmp_path, options, message):
    result = cli("encode", vae, images[0], "-o", tmp_path / "z.npy", *options)
    assert result.exit_code == 2 and message in one_line(result)
    assert not (tmp_path / "z.npy").exists()


def test_decode_flip_gives_the_mirrored_files_decoded(cli, vae, images, tmp_path):
    """`decode --flip` decodes latents_flip: the same PNGs as decoding the mirrored files'
    latents; info says what a file and a folder store."""
    photos_dir, mirrored_dir = images
    both, mirrored = tmp_path / "both", tmp_path / "mirrored"
    common = ["--size", "native"]
    assert cli("encode", vae, photos_dir, "-o", both, *common, "--flip").exit_code == 0
    assert cli("encode", vae, mirrored_dir, "-o", mirrored, *common).exit_code == 0
    assert cli("decode", vae, both, "-o", tmp_path / "a", "--flip").exit_code == 0
    assert cli("decode", vae, mirrored, "-o", tmp_path / "b").exit_code == 0
    flipped, expected = read_pngs(tmp_path / "a"), read_pngs(tmp_path / "b")
    assert sorted(flipped) == sorted(expected) and len(flipped) == 4
    for name, image in expected.items():
        assert np.array_equal(flipped[name], image), name

    result = cli("decode", vae, mirrored, "-o", tmp_path / "c", "--flip")
    assert result.exit_code == 2 and "holds no latents_flip" in one_line(result)
    result = cli("info", both, "--json")
    assert json.loads(result.stdout)["settings"]["flip"] is True
    single = tmp_path / "z.safetensors"
    assert cli("encode", vae, photos_dir / "a", "-o", single, "--flip", "--store", "moments",
               "--dtype", "float16").exit_code == 0  # fmt: skip
    facts = json.loads(cli("info", single, "--json").stdout)
    assert facts["kind"] == "latent file" and facts["dtype"] == "float16"
    assert facts["stored"] == ["latents", "latents_std", "latents_flip", "latents_flip_std"]


def test_resume_with_another_storage_is_refused(cli, vae, images, tmp_path):
    photos_dir, _ = images
    out = tmp_path / "lf"
    assert cli("encode", vae, photos_dir, "-o", out, "--size", "native").exit_code == 0
    result = cli("encode", vae, photos_dir, "-o", out, "--size", "native", "--resume",
                 "--dtype", "bfloat16")  # fmt: skip
    line = one_line(result)
    assert result.exit_code == 2 and "--dtype" in line and "bfloat16" in line


def test_info_shows_names_with_markup_as_they_are(cli, vae, images, tmp_path):
    """A weights folder and a latent file named with rich markup: `info` shows the names as
    they are, neither styled nor with escapes added."""
    import shutil

    odd = tmp_path / "v[red]ae"
    shutil.copytree(vae, odd)
    folder, single = tmp_path / "lf", tmp_path / "z[b].safetensors"
    assert cli("encode", odd, images[0] / "a", "-o", folder, "--size", "48x64").exit_code == 0
    assert cli("encode", odd, images[0] / "a", "-o", single, "--size", "48x64").exit_code == 0
    assert f"({odd})" in " ".join(cli("info", folder).stdout.split())
    assert "z[b].safetensors" in cli("info", single).stdout.replace("\n", "")

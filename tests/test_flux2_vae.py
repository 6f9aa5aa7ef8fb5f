"""The FLUX.2 VAE (diffusers AutoencoderKLFlux2) in aecli: folders read and compared with
diffusers' own class, the pipelines' latent convention (2x2 patchify and the BatchNorm's
running statistics) for --scaled, every command, exact tiles, export back, fine-tuning, bad
input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    check_exact_tiles,
    check_folder_and_commands,
    fine_tune_frozen_encoder,
    image_chw,
    photos,
)
from safetensors.torch import load_file, save_file

from aecli.errors import UsageError, WeightsError
from aecli.io.latents import read_latents
from aecli.io.weights import load_weights

diffusers = pytest.importorskip("diffusers")

SMALL = dict(
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=8,
    sample_size=64,
)
SMALLER_DECODER = dict(decoder_block_out_channels=(8, 8, 16, 16))


def make_flux2(seed: int = 0, **overrides):
    """A random diffusers AutoencoderKLFlux2 at test size, every weight moved off its initial
    value and the BatchNorm given statistics far from (0, 1), so that a wrongly mapped tensor
    or statistic shows."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.uniform_(0.2, 3.0)
        vae.bn.num_batches_tracked.fill_(7)
    return vae


@pytest.fixture
def flux2(tmp_path):
    vae = make_flux2()
    vae.save_pretrained(tmp_path / "vae")
    return vae


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """diffusers' Flux2Pipeline._patchify_latents (pipelines/flux2/pipeline_flux2.py, 0.42),
    copied: importing the pipeline needs transformers."""
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(batch_size, num_channels_latents * 4, height // 2, width // 2)


def pipeline_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """What FLUX.2's pipelines make of posterior modes z (Flux2Pipeline._encode_vae_image)."""
    patched = patchify(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (patched - mean) / std


@pytest.mark.parametrize(
    "overrides",
    [{}, SMALLER_DECODER, {**SMALLER_DECODER, "latent_channels": 32}],
    ids=["same-decoder", "smaller-decoder", "32-channels"],
)
def test_encode_and_decode_equal_diffusers(tmp_path, overrides):
    """The posterior mode within 1e-4 of its range, images within one 8-bit level; the
    statistics are the model's buffers."""
    vae = make_flux2(**overrides)
    vae.save_pretrained(tmp_path / "vae")
    model, info = load_weights(tmp_path / "vae")
    assert info.preset == "AutoencoderKLFlux2 (diffusers folder)"
    assert model.variational
    assert torch.equal(model.latent_norm.running_mean, vae.bn.running_mean)
    assert torch.equal(model.latent_norm.running_var, vae.bn.running_var)
    assert model.latent_norm.num_batches_tracked.item() == 7
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        reference = vae.encode(x).latent_dist.mode()
        latents = model.encode(x).mode()
        spread = (reference.max() - reference.min()).item()
        assert latents.shape == reference.shape == (2, vae.config.latent_channels, 6, 8)
        assert (latents - reference).abs().max().item() <= 1e-4 * spread
        levels = (model.decode(reference) - vae.decode(reference).sample).abs().max() * 127.5
    assert levels.item() <= 1


def test_info_shows_the_family_and_its_convention(tmp_path, flux2, cli):
    result = cli("info", tmp_path / "vae", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "AutoencoderKLFlux2" and not facts["deterministic"]
    assert facts["latent_shape"] == [8, 8, 8]
    convention = facts["latent_convention"]
    assert convention["kind"] == "batchnorm" and convention["patch"] == 2
    assert convention["scaled_shape"] == [32, 4, 4]
    std = torch.sqrt(flux2.bn.running_var.double() + 1e-4)
    shift, scale = (torch.tensor(convention[k], dtype=torch.float64) for k in ("shift", "scale"))
    assert torch.allclose(shift, flux2.bn.running_mean.double())
    assert torch.allclose(scale, 1 / std)
    result = cli("info", tmp_path / "vae")
    assert "AutoencoderKLFlux2 (the FLUX.2 VAE" in result.stdout
    assert "patchify 2x2(z)" in result.stdout and "BatchNorm" in result.stdout


def test_the_commands_on_a_flux2_folder(tmp_path, cli):
    """encode (file and folder), --scaled as the FLUX.2 pipelines, decode (undoing it),
    reconstruct, interpolate, diff and sample, the figures against diffusers; with the smaller
    decoder."""
    flux2 = make_flux2(**SMALLER_DECODER)
    vae = tmp_path / "vae"
    flux2.save_pretrained(vae)
    images = photos(tmp_path / "photos")
    common = ("--size", "native", "--device", "cpu")
    result = cli("encode", vae, tmp_path / "photos", "-o", tmp_path / "z.safetensors", *common)
    assert result.exit_code == 0, result.output
    plain = read_latents(tmp_path / "z.safetensors").latents
    x = torch.stack([image_chw(p) for p in images]) / 127.5 - 1
    with torch.no_grad():
        reference = flux2.encode(x).latent_dist.mode()
        expected = ((flux2.decode(reference).sample.clamp(-1, 1) + 1) * 127.5).round()
        pipeline = pipeline_latents(flux2, reference)
    spread = (reference.max() - reference.min()).item()
    assert plain.shape == (2, 8, 6, 8)
    assert (plain - reference).abs().max().item() <= 1e-4 * spread
    out = tmp_path / "zs.safetensors"
    result = cli("encode", vae, tmp_path / "photos", "--scaled", "-o", out, *common)
    assert result.exit_code == 0, result.output
    scaled = read_latents(out)
    assert scaled.latents.shape == pipeline.shape == (2, 32, 3, 4)
    assert scaled.scaling.patch == 2
    scaled_spread = (pipeline.max() - pipeline.min()).item()
    assert (scaled.latents - pipeline).abs().max().item() <= 1e-4 * scaled_spread
    # decode undoes the recorded convention: as decoding the raw latents, and diffusers'
    for name, latents in (("raw", tmp_path / "z.safetensors"), ("scaled", out)):
        result = cli("decode", vae, latents, "-o", tmp_path / name, "--device", "cpu")
        assert result.exit_code == 0, result.output
    for i, path in enumerate(images):
        assert (image_chw(tmp_path / "scaled" / path.name) - expected[i]).abs().max() <= 1
        raw = image_chw(tmp_path / "raw" / path.name)
        assert (image_chw(tmp_path / "scaled" / path.name) - raw).abs().max() <= 1
    # --scaled on decode: latents that do not record it (a .npy) are taken as scaled
    np.save(tmp_path / "p.npy", pipeline.numpy())
    result = cli("decode", vae, tmp_path / "p.npy", "--scaled", "-o", tmp_path / "npy",
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (image_chw(tmp_path / "npy" / "000000.png") - expected[0]).abs().max() <= 1
    # a latent folder, scaled, and back; the other commands
    check_folder_and_commands(cli, vae, images, expected, tmp_path, "--scaled", *common)
    result = cli("interpolate", vae, tmp_path / "folder#0", tmp_path / "folder#1", "-o",
                 tmp_path / "strip2.png", "--steps", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = cli("sample", vae, "-n", "2", "-o", tmp_path / "s.png", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_scaled_latents_need_whole_patches_and_no_factors(tmp_path, flux2, cli):
    """An image whose latent has an odd side cannot be patchified, and per-channel statistics
    take no --scaling-factor: one line each."""
    photos(tmp_path / "photos", size=(40, 64))
    result = cli("encode", tmp_path / "vae", tmp_path / "photos", "--size", "native",
                 "--scaled", "-o", tmp_path / "z.npy")  # fmt: skip
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "2x2 patches" in result.stderr
    result = cli("encode", tmp_path / "vae", tmp_path / "photos", "--scaling-factor", "0.5",
                 "-o", tmp_path / "z.npy")  # fmt: skip
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "scales its latents per channel" in result.stderr


def test_a_scaled_latent_folder_with_buckets_and_resume(tmp_path, flux2, cli):
    """--buckets with --scaled gives sides in whole patches (multiples of 16 here); --resume
    continues with the same convention and refuses another in one short line."""
    vae, folder = tmp_path / "vae", tmp_path / "folder"
    photos(tmp_path / "photos")
    common = ("--device", "cpu", "--scaled")
    result = cli("encode", vae, tmp_path / "photos", "--buckets", "64", "-o", folder, *common)
    assert result.exit_code == 0, result.output
    index = json.loads((folder / "index.json").read_text())
    assert index["settings"]["scaling"]["patch"] == 2
    assert all(side % 16 == 0 for bucket in index["settings"]["buckets"] for side in bucket)
    assert all(s["shape"][0] == 32 for s in index["shapes"])
    result = cli("encode", vae, tmp_path / "photos", "--buckets", "64", "-o", folder, *common,
                 "--resume")  # fmt: skip
    assert result.exit_code == 0, result.output
    given = ",".join("x".join(map(str, b)) for b in index["settings"]["buckets"])
    result = cli("encode", vae, tmp_path / "photos", "--buckets", given, "-o", folder,
                 "--device", "cpu", "--resume")  # fmt: skip
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "per channel (32" in result.stderr and len(result.stderr) < 400
    result = cli("encode", vae, tmp_path / "photos", "--buckets", "64x56", "-o",
                 tmp_path / "other", *common)  # fmt: skip
    assert result.exit_code == 2 and "multiples of 16" in result.stderr


def test_exact_tiles_equal_untiled(tmp_path, flux2):
    """Tiles of 128 on a 500x372 image: the latents within 1e-3 of their range, the image at
    least 50 dB from untiled."""
    check_exact_tiles(tmp_path / "vae")


def test_export_loads_back_in_diffusers(tmp_path, cli):
    """diffusers reads the exported folder with equal tensors, the BatchNorm's included, and
    an equal config; the aecli weights file carries the statistics too."""
    flux2 = make_flux2(**SMALLER_DECODER)
    flux2.save_pretrained(tmp_path / "vae")
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "w.safetensors", "--format", "aecli")
    assert result.exit_code == 0, result.output
    result = cli("export", tmp_path / "w.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "out").eval()
    reference = flux2.state_dict()
    assert set(again.state_dict()) == set(reference)
    for key, tensor in again.state_dict().items():
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
    for key, value in flux2.config.items():
        if not key.startswith("_"):
            plain = list(value) if isinstance(value, tuple) else value
            assert again.config[key] == plain, key


def test_init_fine_tunes_the_decoder_and_keeps_the_statistics(tmp_path, flux2, cli):
    """train --init with the encoder frozen: the encoder and the statistics stay exactly as
    they were, the decoder moves, and the result exports as an AutoencoderKLFlux2 again."""
    out = tmp_path / "run"
    after = fine_tune_frozen_encoder(cli, tmp_path / "vae", out)
    result = cli("export", out / "model.safetensors", "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "tuned").eval()
    assert torch.equal(again.bn.running_var, flux2.bn.running_var)
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert (after.encode(x).mode() - again.encode(x).latent_dist.mode()).abs().max() <= 1e-4
        z = torch.randn(1, 8, 4, 4)
        assert (after.decode(z) - again.decode(z).sample).abs().max() <= 1e-4


def test_a_missing_or_misshapen_tensor_names_the_key_and_the_family(tmp_path, flux2):
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != "bn.running_var"}, path)
    with pytest.raises(WeightsError, match=r"missing tensor bn\.running_var for its "
                       r"AutoencoderKLFlux2 layout"):  # fmt: skip
        load_weights(tmp_path / "vae")
    save_file({**tensors, "bn.running_mean": torch.zeros(8)}, path)
    with pytest.raises(WeightsError, match=r"bn\.running_mean has shape \[8\], its "
                       r"AutoencoderKLFlux2 layout needs \[32\]"):  # fmt: skip
        load_weights(tmp_path / "vae")
    save_file({**tensors, "bn.num_batches_tracked": torch.tensor(7.0)}, path)
    with pytest.raises(WeightsError, match=r"bn\.num_batches_tracked is F32; aecli reads "
                       r"AutoencoderKLFlux2 counters as I64"):  # fmt: skip
        load_weights(tmp_path / "vae")


HOSTILE = {
    "patch": ({"patch_size": [2, 4]}, "patch_size: [2, 4] is not a square"),
    "eps": ({"batch_norm_eps": -1.0}, "batch_norm_eps must be positive"),
    "decoder levels": ({"decoder_block_out_channels": [8, 8]}, "one width per level"),
    "decoder width": ({"decoder_block_out_channels": [8, 8, 4, 16]}, "below norm_num_groups"),
    "wide": ({"block_out_channels": [8192] * 8, "layers_per_block": 16}, "AutoencoderKLFlux2 of"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_config_json_is_one_line(tmp_path, flux2, cli, case):
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    changes, expected = HOSTILE[case]
    config.update(changes)
    if case == "wide":
        config["down_block_types"] = config["up_block_types"] = ["DownEncoderBlock2D"] * 8
        config["up_block_types"] = ["UpDecoderBlock2D"] * 8
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    result = cli("info", tmp_path / "vae")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_the_scaling_round_trips_on_its_own():
    """patchify then unpatchify is the identity, in the pipelines' channel order."""
    from aecli.io.latents import LatentScaling

    z = torch.randn(2, 3, 4, 6)
    scaling = LatentScaling(tuple(torch.rand(12).add(0.5).tolist()), tuple(range(12)), 2)
    assert torch.allclose(scaling.undo(scaling.apply(z)), z, atol=1e-5)
    plain = LatentScaling(1.0, 0.0, 2).apply(z)
    assert torch.equal(plain, patchify(z))
    assert LatentScaling.from_record(json.loads(json.dumps(scaling.record()))) == scaling
    with pytest.raises(UsageError, match="2x2 patches"):
        scaling.apply(torch.randn(1, 3, 5, 6))


def test_flux2s_own_file_is_read_and_written(tmp_path, cli):
    """FLUX.2's own ae.safetensors layout (black-forest-labs/flux2: latent diffusion's names,
    the latent's 1x1 convolutions inside the encoder and decoder, the BatchNorm as bn.*) is
    written by export --format single-file and recognised from its keys with no config.json:
    diffusers' own latent-diffusion conversion reads it back to the model's tensors, and aecli
    encodes from it as diffusers does. The released layout: 32 groups, so widths of 32."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = make_flux2(
        block_out_channels=(32, 32, 64, 64),
        decoder_block_out_channels=(32, 32, 32, 32),
        norm_num_groups=32,
    )
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "ae.safetensors"
    result = cli("export", tmp_path / "vae", "-o", out, "--format", "single-file")
    assert result.exit_code == 0, result.output
    written = load_file(out)
    for key in ("encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_var"):
        assert key in written, key
    # diffusers' latent-diffusion conversion, once the 1x1 convolutions are where it looks
    moved = {
        k.replace("encoder.quant_conv.", "quant_conv.").replace(
            "decoder.post_quant_conv.", "post_quant_conv."
        ): t
        for k, t in written.items()
    }
    converted = convert_ldm_vae_checkpoint(moved, dict(vae.config))
    reference = vae.state_dict()
    assert set(reference) - set(converted) == {k for k in reference if k.startswith("bn.")}
    for key, tensor in converted.items():
        assert torch.equal(tensor.reshape(reference[key].shape), reference[key]), key
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(written[f"bn.{key}"], reference[f"bn.{key}"]), key
    model, info = load_weights(out)
    assert info.preset == "AutoencoderKLFlux2 (original keys)"
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mode()
        got = model.encode(x).mode()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    # a BatchNorm of the wrong width names the tensor and the family
    written["bn.running_mean"] = written["bn.running_mean"][:-1]
    save_file(written, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=r"bn.running_mean has shape \[31\].*AutoencoderKLFlux2"):
        load_weights(tmp_path / "bad.safetensors")

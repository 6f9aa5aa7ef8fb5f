"""The Qwen-Image and Wan 2.1 / 2.2 VAEs (diffusers AutoencoderKLQwenImage, AutoencoderKLWan)
in aecli: a video VAE run on single frames, compared with diffusers' own classes on (B, C, 1,
H, W); the pipelines' per-channel latent convention for --scaled; every command, exact tiles,
export back, fine-tuning, the Wan VAE's own single files, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    check_automatic_tiling,
    check_exact_tiles,
    check_folder_and_commands,
    fine_tune_frozen_encoder,
    image_chw,
    photos,
)
from safetensors.torch import load_file, save_file

from aecli.errors import WeightsError
from aecli.io.latents import read_latents
from aecli.io.weights import load_weights

diffusers = pytest.importorskip("diffusers")


def statistics(z: int) -> dict:
    """Per-channel latents_mean and latents_std far from (0, 1), written as configs write them
    (four decimals)."""
    generator = torch.Generator().manual_seed(z)
    mean = (torch.randn(z, generator=generator) * 0.8).tolist()
    std = (torch.rand(z, generator=generator) * 2.5 + 0.4).tolist()
    return {"latents_mean": [round(v, 4) for v in mean], "latents_std": [round(v, 4) for v in std]}


SMALL = {
    "qwen": (diffusers.AutoencoderKLQwenImage, dict(base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2],
                                                   num_res_blocks=1, **statistics(8))),
    # Wan 2.1: the decoder's levels after an upsampling start at half the width (a shortcut)
    "wan21": (diffusers.AutoencoderKLWan, dict(base_dim=16, z_dim=8, dim_mult=[1, 1, 2, 2],
                                              num_res_blocks=1, **statistics(8))),
    # Wan 2.2: 2x2 patches, residual down / up blocks (shortcuts that average and repeat), a
    # wider decoder, f16
    "wan22": (diffusers.AutoencoderKLWan, dict(base_dim=16, decoder_base_dim=24, z_dim=12,
                                              dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                              is_residual=True, patch_size=2, in_channels=12,
                                              out_channels=12, scale_factor_spatial=16,
                                              **statistics(12))),
}  # fmt: skip
FAMILY = {
    "qwen": "AutoencoderKLQwenImage",
    "wan21": "AutoencoderKLWan",
    "wan22": "AutoencoderKLWan",
}


def make(kind: str, seed: int = 0, **overrides):
    """A random diffusers VAE of `kind` at test size, every weight moved off its initial value
    (the RMS norms' scales off 1) so that a wrongly mapped tensor shows."""
    cls, settings = SMALL[kind]
    torch.manual_seed(seed)
    vae = cls(**{**settings, **overrides}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def saved(tmp_path, kind: str, **overrides):
    vae = make(kind, **overrides)
    vae.save_pretrained(tmp_path / "vae")
    return vae


def encode(vae, x: torch.Tensor) -> torch.Tensor:
    """diffusers' posterior mode of images (B, C, H, W), as single frames."""
    return vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z[:, :, None]).sample[:, :, 0]


def pipeline_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """What the Qwen-Image and Wan pipelines make of posterior modes z (QwenImagePipeline /
    WanPipeline, 0.42: `(latents - latents_mean) * (1.0 / latents_std)`), in float32."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    inverse = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return (z - mean) * inverse


@pytest.mark.parametrize("kind", list(SMALL))
def test_encode_and_decode_equal_diffusers(tmp_path, kind):
    """The posterior mode within 1e-4 of its range, images within one 8-bit level (diffusers
    clamps its images to [-1, 1]; aecli where they become pixels)."""
    vae = saved(tmp_path, kind)
    model, info = load_weights(tmp_path / "vae")
    assert info.preset == f"{FAMILY[kind]} (diffusers folder)"
    assert model.variational
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    factor = 16 if kind == "wan22" else 8
    with torch.no_grad():
        reference = encode(vae, x)
        latents = model.encode(x).mode()
        spread = (reference.max() - reference.min()).item()
        assert latents.shape == reference.shape == (2, vae.config.z_dim, 48 // factor, 64 // factor)
        assert (latents - reference).abs().max().item() <= 1e-4 * spread
        levels = (model.decode(reference).clamp(-1, 1) - decode(vae, reference)).abs().max()
    assert levels.item() * 127.5 <= 1


def test_info_shows_the_family_and_its_convention(tmp_path, cli):
    vae = saved(tmp_path, "wan22")
    result = cli("info", tmp_path / "vae", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "AutoencoderKLWan" and not facts["deterministic"]
    assert facts["latent_shape"] == [12, 16, 16]  # at 256x256
    convention = facts["latent_convention"]
    assert convention["kind"] == "affine"
    assert convention["shift"] == vae.config.latents_mean
    assert np.allclose(convention["scale"], 1 / np.array(vae.config.latents_std), rtol=1e-12)
    result = cli("info", tmp_path / "vae")
    assert "AutoencoderKLWan (the Wan 2.1 and 2.2 VAEs" in result.stdout
    assert "per channel (12" in result.stdout and "latents_std" in result.stdout


@pytest.mark.parametrize("kind", ["qwen", "wan22"])
def test_the_commands_on_a_folder(tmp_path, cli, kind):
    """encode (file and folder), --scaled as the pipelines, decode (undoing it), reconstruct,
    interpolate, diff and sample, the figures against diffusers."""
    vae = saved(tmp_path, kind)
    folder = tmp_path / "vae"
    images = photos(tmp_path / "photos")
    common = ("--size", "native", "--device", "cpu")
    result = cli("encode", folder, tmp_path / "photos", "-o", tmp_path / "z.safetensors", *common)
    assert result.exit_code == 0, result.output
    plain = read_latents(tmp_path / "z.safetensors").latents
    x = torch.stack([image_chw(p) for p in images]) / 127.5 - 1
    with torch.no_grad():
        reference = encode(vae, x)
        expected = ((decode(vae, reference).clamp(-1, 1) + 1) * 127.5).round()
        pipeline = pipeline_latents(vae, reference)
    spread = (reference.max() - reference.min()).item()
    assert plain.shape == reference.shape
    assert (plain - reference).abs().max().item() <= 1e-4 * spread
    out = tmp_path / "zs.safetensors"
    result = cli("encode", folder, tmp_path / "photos", "--scaled", "-o", out, *common)
    assert result.exit_code == 0, result.output
    scaled = read_latents(out)
    # the convention is the pipelines' formula (float32, to 1e-5 relative), and the latents
    # scaled with it diffusers' to 1e-4 of their range
    assert torch.allclose(scaled.scaling.apply(reference), pipeline, rtol=1e-5, atol=1e-6)
    scaled_spread = (pipeline.max() - pipeline.min()).item()
    assert (scaled.latents - pipeline).abs().max().item() <= 1e-4 * scaled_spread
    for name, latents in (("raw", tmp_path / "z.safetensors"), ("scaled", out)):
        result = cli("decode", folder, latents, "-o", tmp_path / name, "--device", "cpu")
        assert result.exit_code == 0, result.output
    for i, path in enumerate(images):
        assert (image_chw(tmp_path / "scaled" / path.name) - expected[i]).abs().max() <= 1
        assert (image_chw(tmp_path / "raw" / path.name) - expected[i]).abs().max() <= 1
    np.save(tmp_path / "p.npy", pipeline.numpy())
    result = cli("decode", folder, tmp_path / "p.npy", "--scaled", "-o", tmp_path / "npy",
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (image_chw(tmp_path / "npy" / "000000.png") - expected[0]).abs().max() <= 1
    check_folder_and_commands(cli, folder, images, expected, tmp_path, "--scaled", *common)
    result = cli("sample", folder, "-n", "2", "-o", tmp_path / "s.png", "--device", "cpu")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kind", ["wan21", "wan22"])
def test_exact_tiles_equal_untiled(tmp_path, kind):
    """Tiles of 128 on a 500x372 image: the latents within 1e-3 of their range, the image at
    least 50 dB from untiled (causal convolutions as their last slice, the downsampling's
    asymmetric padding, RMS norm per pixel, attention over the whole latent, Wan 2.2's patches
    and shortcuts)."""
    saved(tmp_path, kind)
    check_exact_tiles(tmp_path / "vae")


def test_automatic_tiling_where_an_image_does_not_fit(tmp_path, monkeypatch):
    saved(tmp_path, "wan22")
    check_automatic_tiling(tmp_path / "vae", monkeypatch, (192, 256))


def equal_to(again, vae) -> None:
    """Every tensor and every config value of `again` (loaded back) as `vae`'s."""
    reference = again.state_dict(), vae.state_dict()
    assert set(reference[0]) == set(reference[1])
    for key, tensor in reference[0].items():
        assert tensor.dtype == reference[1][key].dtype, key
        assert torch.equal(tensor, reference[1][key]), key
    for key, value in vae.config.items():
        if not key.startswith("_"):
            plain = list(value) if isinstance(value, tuple) else value
            assert again.config[key] == plain, key


@pytest.mark.parametrize("kind", ["qwen", "wan22"])
def test_export_loads_back_in_diffusers(tmp_path, cli, kind):
    """Through aecli's own weights file and back: diffusers reads the folder with equal tensors
    (the time convolutions a single frame never runs included) and an equal config."""
    vae = saved(tmp_path, kind)
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "w.safetensors", "--format", "aecli")
    assert result.exit_code == 0, result.output
    result = cli("export", tmp_path / "w.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    equal_to(type(vae).from_pretrained(tmp_path / "out").eval(), vae)


def test_init_fine_tunes_the_decoder_and_exports_it(tmp_path, cli):
    """train --init with the encoder frozen: the encoder stays exactly as it was, the decoder
    moves, and the result exports as an AutoencoderKLQwenImage that diffusers runs as aecli
    does."""
    vae = saved(tmp_path, "qwen")
    out = tmp_path / "run"
    after = fine_tune_frozen_encoder(cli, tmp_path / "vae", out)
    result = cli("export", out / "model.safetensors", "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKLQwenImage.from_pretrained(tmp_path / "tuned").eval()
    before = vae.state_dict()
    tuned = again.state_dict()
    for key in before:  # only what a single frame uses moved: not the time convolutions
        if "time_conv" in key or key.startswith("encoder."):
            assert torch.equal(tuned[key], before[key]), key
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert (after.encode(x).mode() - encode(again, x)).abs().max() <= 1e-4
        z = torch.randn(1, 8, 4, 4)
        assert (after.decode(z).clamp(-1, 1) - decode(again, z)).abs().max() <= 1e-4


def test_a_missing_or_misshapen_tensor_names_the_key_and_the_family(tmp_path):
    saved(tmp_path, "wan22")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    key = "decoder.up_blocks.0.upsampler.time_conv.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, path)
    with pytest.raises(
        WeightsError, match=rf"missing tensor {key} for its AutoencoderKLWan layout"
    ):
        load_weights(tmp_path / "vae")
    save_file({**tensors, "encoder.conv_in.weight": torch.zeros(16, 12, 3, 3)}, path)
    with pytest.raises(WeightsError, match=r"encoder\.conv_in\.weight has shape \[16, 12, 3, 3\], "
                       r"its AutoencoderKLWan layout needs \[16, 12, 3, 3, 3\]"):  # fmt: skip
        load_weights(tmp_path / "vae")


HOSTILE = {
    "wide": ({"base_dim": 8192, "dim_mult": [1, 1, 1, 1]}, "AutoencoderKLWan of about"),
    "deep": ({"num_res_blocks": 10**9}, "num_res_blocks: 1000000000 is not from 1 to 16"),
    "levels": ({"dim_mult": [1] * 9000}, "dim_mult: a list of 1 to 8 numbers"),
    "time": ({"temperal_downsample": [True]}, "temperal_downsample: 1 flags"),
    "std": ({"latents_std": [1.0] * 11 + [-1.0]}, "latents_std: the spreads must be positive"),
    "statistics": ({"latents_mean": [0.0] * 3}, "latents_mean: 3 numbers for 12 latent channels"),
    "patch": ({"patch_size": 3}, "in_channels: 12 is not channels x patch_size^2"),
    "attention": ({"is_residual": False, "attn_scales": [0.5]}, "attention in the encoder's"),
    "nan": ({"latents_mean": [float("nan")] * 12}, "latents_mean: 'nan' is not a finite"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_config_json_is_one_line(tmp_path, cli, case):
    saved(tmp_path, "wan22")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    changes, expected = HOSTILE[case]
    config.update(changes)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    result = cli("info", tmp_path / "vae")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_qwen_image_2_1_is_another_class(tmp_path, cli):
    """AutoencoderKLQwenImage21 holds 2-D weights and four-channel images: another layout,
    refused in one line that lists what aecli reads."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage21"}))
    result = cli("info", tmp_path)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "AutoencoderKLQwenImage (the Qwen-Image VAE)" in result.stderr
    assert "AutoencoderKLWan (the Wan 2.1 and 2.2 VAEs)" in result.stderr


def test_wan_21_and_qwen_image_files_are_read_and_written(tmp_path, cli):
    """The Wan VAE's own single-file layout (Wan2.1_VAE's keys, which ComfyUI's
    qwen_image_vae.safetensors has too) is written by export --format single-file, diffusers'
    own conversion (convert_wan_vae_to_diffusers: the release's 4 levels of 2 blocks) reads it
    back to the model's tensors, and aecli reads it from its keys and shapes alone, taking the
    release from the file's name."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    vae = saved(tmp_path, "qwen", base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                **statistics(16))  # fmt: skip
    out = tmp_path / "qwen_image_vae.safetensors"
    result = cli("export", tmp_path / "vae", "-o", out, "--format", "single-file")
    assert result.exit_code == 0, result.output
    written = load_file(out)
    for key in ("encoder.conv1.weight", "encoder.downsamples.3.residual.0.gamma", "conv1.weight",
                "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.7.time_conv.weight",
                "encoder.middle.1.to_qkv.weight", "decoder.head.2.bias"):  # fmt: skip
        assert key in written, key
    converted = convert_wan_vae_to_diffusers(dict(written))
    reference = vae.state_dict()
    assert set(converted) == set(reference)
    for key, tensor in converted.items():
        assert torch.equal(tensor, reference[key]), key
    model, info = load_weights(out)
    assert info.preset == "AutoencoderKLQwenImage (original keys)"
    latent = info.config.model.latent  # the files carry none: the release's statistics
    assert latent.shift_factor[0] == -0.7571 and latent.scaling_factor[0] == 1 / 2.8184
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        expected = encode(vae, x)
        assert (model.encode(x).mode() - expected).abs().max() <= 1e-4 * expected.abs().max()
    (tmp_path / "wan_2.1_vae.safetensors").write_bytes(out.read_bytes())
    assert load_weights(tmp_path / "wan_2.1_vae.safetensors")[1].preset.startswith(
        "AutoencoderKLWan"
    )
    (tmp_path / "vae.safetensors").write_bytes(out.read_bytes())
    result = cli("info", tmp_path / "vae.safetensors")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Wan 2.1 (AutoencoderKLWan) or Qwen-Image (AutoencoderKLQwenImage)" in result.stderr
    assert "put qwen or wan in it" in result.stderr
    # a misshapen tensor names its key and the family
    written["decoder.upsamples.4.shortcut.weight"] = torch.zeros(64, 16, 1, 1, 1)
    save_file(written, out)
    wrong = r"decoder\.upsamples\.4\.shortcut\.weight has shape \[64, 16, 1, 1, 1\], its "
    with pytest.raises(WeightsError, match=wrong + "AutoencoderKLQwenImage layout needs"):
        load_weights(out)


def test_wan_22_files_are_read_and_written(tmp_path, cli):
    """Wan 2.2's own layout (vae2_2.py: each level's blocks nested as downsamples.I.downsamples.J
    and upsamples.I.upsamples.J, the resampling after them): export --format single-file
    writes it, aecli reads it back from its keys alone as an AutoencoderKLWan with the 2x2
    patch, equal to diffusers."""
    vae = saved(tmp_path, "wan22")
    out = tmp_path / "Wan2.2_VAE.safetensors"
    result = cli("export", tmp_path / "vae", "-o", out, "--format", "single-file")
    assert result.exit_code == 0, result.output
    written = load_file(out)
    for key in ("encoder.conv1.weight", "encoder.downsamples.1.downsamples.0.shortcut.weight",
                "encoder.downsamples.1.downsamples.1.time_conv.weight",
                "decoder.upsamples.2.upsamples.2.resample.1.weight",
                "decoder.upsamples.3.upsamples.1.residual.6.weight"):  # fmt: skip
        assert key in written, key
    assert written["encoder.conv1.weight"].shape == (16, 12, 3, 3, 3)
    model, info = load_weights(out)
    assert info.preset == "AutoencoderKLWan (original keys)"
    assert info.config.model.encoder[0].patch == 2
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        expected = encode(vae, x)
        assert (model.encode(x).mode() - expected).abs().max() <= 1e-4 * expected.abs().max()
    # and back to a diffusers folder, equal but for the statistics the file does not carry
    result = cli("export", out, "-o", tmp_path / "again")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKLWan.from_pretrained(tmp_path / "again")
    for key, tensor in vae.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key

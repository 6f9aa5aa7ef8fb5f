"""Stable Diffusion-family VAEs in aecli: diffusers folders and single files read, compared with
diffusers' own AutoencoderKL in fp32, exported back, fine-tuned, scaled latents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import photos
from PIL import Image
from safetensors.torch import load_file, save_file

from aecli.errors import UsageError, WeightsError
from aecli.io import vae_files
from aecli.io.latents import read_latents
from aecli.io.weights import load_weights, read_weights_info

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

# The two layout families at test size: SD 1.x/2.x/SDXL (4 latent channels, quant convs) and
# SD3/FLUX (16 channels, no quant convs). norm_num_groups 32 as in every released VAE.
SD_STYLE = dict(latent_channels=4)
FLUX_STYLE = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
TOLERANCE = 1e-4


def make_vae(seed: int = 0, **overrides):
    """A random diffusers AutoencoderKL (2 levels, 32 and 64 channels), with every weight,
    norms included, moved off its initial value so that a wrongly mapped tensor shows."""
    config = dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**{**config, **overrides}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def compare(vae, model, size=(32, 48)) -> tuple[float, float]:
    """Max abs differences of the encoder's mean and the decoder's output, aecli vs diffusers."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        z = torch.randn_like(mean)
        enc = (model.encode(x).mode() - mean).abs().max().item()
        dec = (model.decode(z) - vae.decode(z).sample).abs().max().item()
    return enc, dec


@pytest.mark.parametrize("family", [SD_STYLE, FLUX_STYLE], ids=["sd", "flux"])
def test_diffusers_folder_matches_diffusers(tmp_path, family):
    vae = make_vae(**family)
    vae.save_pretrained(tmp_path / "vae")
    model, info = load_weights(tmp_path / "vae")
    assert max(compare(vae, model)) <= TOLERANCE
    latent = info.config.model.latent
    assert latent.channels == family["latent_channels"]
    assert latent.head == family.get("use_quant_conv", True)
    assert latent.scaling_factor == vae.config.scaling_factor


def test_fp16_variant_in_a_pipeline_folder(tmp_path):
    vae = make_vae()
    vae.half().save_pretrained(tmp_path / "pipe" / "vae", variant="fp16")
    model, _ = load_weights(tmp_path / "pipe")  # the pipeline folder: its vae/ is found
    assert next(model.parameters()).dtype == torch.float32
    assert max(compare(vae.float(), model)) <= TOLERANCE


def test_legacy_attention_names(tmp_path):
    """diffusers before 0.14 named the attention projections query/key/value/proj_attn."""
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    tensors = {}
    for key, value in load_file(path).items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{legacy}")
        tensors[key] = value
    save_file(tensors, path)
    assert max(compare(vae, load_weights(tmp_path / "vae")[0])) <= TOLERANCE


def test_single_file_layout_is_what_diffusers_converts(tmp_path):
    """aecli's latent-diffusion names, run through diffusers' own single-file conversion, give
    back exactly the diffusers state dict; aecli then reads the single file like diffusers."""
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    model, info = load_weights(tmp_path / "vae")
    layout, why = vae_files.layout_of_config(info.config)
    assert layout is not None, why
    ldm = vae_files.from_aecli(model.state_dict(), layout, "ldm")
    converted = single_file_utils.convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    reference = vae.state_dict()
    assert set(converted) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(converted[key].reshape(tensor.shape), tensor), key
    save_file(ldm, tmp_path / "vae.safetensors")
    single, single_info = load_weights(tmp_path / "vae.safetensors")
    assert max(compare(vae, single)) <= TOLERANCE
    assert single_info.fingerprint == info.fingerprint
    # the same VAE inside a full Stable Diffusion checkpoint, next to other models' tensors
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4)
    save_file(full, tmp_path / "full.safetensors")
    assert max(compare(vae, load_weights(tmp_path / "full.safetensors")[0])) <= TOLERANCE


def test_flux_single_file_takes_the_flux_factors(tmp_path):
    vae = make_vae(**FLUX_STYLE)
    vae.save_pretrained(tmp_path / "vae")
    model, info = load_weights(tmp_path / "vae")
    layout, _ = vae_files.layout_of_config(info.config)
    save_file(vae_files.from_aecli(model.state_dict(), layout, "ldm"), tmp_path / "f.safetensors")
    latent = read_weights_info(tmp_path / "f.safetensors").config.model.latent
    assert (latent.scaling_factor, latent.shift_factor) == vae_files.KNOWN_FACTORS[16]
    assert not latent.head


def test_every_key_is_accounted_for(tmp_path):
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    missing = dict(tensors)
    del missing["decoder.up_blocks.0.resnets.1.conv2.bias"]
    save_file(missing, path)
    with pytest.raises(WeightsError, match=r"missing tensor decoder\.up_blocks\.0\.resnets\.1"):
        load_weights(tmp_path / "vae")
    save_file({**tensors, "decoder.extra.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match=r"unexpected tensor decoder\.extra\.weight"):
        load_weights(tmp_path / "vae")
    wrong = dict(tensors)
    wrong["encoder.conv_out.bias"] = torch.zeros(5)
    save_file(wrong, path)
    with pytest.raises(WeightsError, match=r"encoder\.conv_out\.bias has shape \[5\]"):
        load_weights(tmp_path / "vae")


@pytest.mark.parametrize("name", ["vae.ckpt", "vae.bin", "vae.pt"])
def test_pickles_are_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({"state_dict": {}}, path)
    with pytest.raises(WeightsError, match="pickle"):
        load_weights(path)


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin, a Python pickle"):
        load_weights(tmp_path / "vae")


def test_another_diffusers_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(WeightsError, match="UNet2DModel; aecli reads AutoencoderKL"):
        load_weights(tmp_path)


@pytest.mark.parametrize("family", [SD_STYLE, FLUX_STYLE], ids=["sd", "flux"])
def test_export_round_trips_through_from_pretrained(tmp_path, cli, family):
    vae = make_vae(**family)
    vae.save_pretrained(tmp_path / "vae")
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "out", "--format", "diffusers")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    reference = vae.state_dict()
    assert set(again.state_dict()) == set(reference)
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    assert again.config.scaling_factor == vae.config.scaling_factor
    # and as one latent-diffusion file, which diffusers' single-file loader reads
    result = cli(
        "export", tmp_path / "vae", "-o", tmp_path / "v.safetensors", "--format", "single-file"
    )
    assert result.exit_code == 0, result.output
    single = diffusers.AutoencoderKL.from_single_file(
        tmp_path / "v.safetensors", config=str(tmp_path / "vae")
    )
    for key, tensor in single.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


def test_export_refuses_another_layout(tmp_path, cli, tiny_weights):
    result = cli("export", tiny_weights, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "not an AutoencoderKL: model.latent" in result.output
    assert not (tmp_path / "out").exists()


def test_export_refuses_the_first_block_that_does_not_fit(tmp_path, cli):
    """cat-kl-f8 at small width has the AutoencoderKL layout; with its decoder's last
    residual block widened it does not, and the message says where."""
    from aecli.config import load_config
    from aecli.io.weights import save_weights
    from aecli.models import build_model

    small = [
        "model.encoder.0.out=32",
        "model.encoder.1.out=32",
        "model.encoder.2.out=32",
        "model.encoder.3.out=32",
        "model.encoder.4.out=32",
        "model.encoder.5.out=64",
        "model.encoder.6.out=64",
        "model.encoder.7.out=64",
        "model.encoder.8.out=64",
        "model.encoder.10.out=64",
        "data.image_size=32",
    ]
    decoder = [
        (1, 64),
        (2, 64),
        (4, 64),
        (5, 64),
        (7, 64),
        (8, 64),
        (10, 64),
        (11, 32),
        (13, 32),
        (14, 32),
    ]
    small += [f"model.decoder.{i}.out={w}" for i, w in decoder]
    config = load_config("cat-kl-f8", small).config
    model = build_model(config)
    save_weights(
        tmp_path / "m.safetensors", model, config, preset="x", data={}, class_names=None, metrics={}
    )
    result = cli("export", tmp_path / "m.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert max(compare(again, model)) <= TOLERANCE
    config = load_config("cat-kl-f8", [*small, "model.decoder.14.out=64"]).config
    save_weights(
        tmp_path / "w.safetensors",
        build_model(config),
        config,
        preset="x",
        data={},
        class_names=None,
        metrics={},
    )
    result = cli("export", tmp_path / "w.safetensors", "-o", tmp_path / "out2")
    assert result.exit_code == 2
    assert "model.decoder.14 is resblock out=64; AutoencoderKL has resblock out=32" in result.output


def encode_native(cli, tmp_path, *options):
    """`aecli encode VAE photos/ --size native ...` on the test's VAE folder and photos."""
    return cli("encode", tmp_path / "vae", tmp_path / "photos", "--size", "native", *options)


def test_workflow_info_reconstruct_encode_scaled_decode(tmp_path, cli):
    """The README's workflow on an SD-style folder, checked against diffusers."""
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    images = photos(tmp_path / "photos")
    result = cli("info", tmp_path / "vae", "--json")
    facts = json.loads(result.stdout)
    assert facts["latent_shape"] == [4, 16, 16] and facts["variational"]
    result = cli(
        "reconstruct",
        tmp_path / "vae",
        tmp_path / "photos",
        "-o",
        tmp_path / "rec",
        "--metrics",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rec" / "photo0.png").is_file()
    z_path = tmp_path / "z.safetensors"
    # compared with diffusers' fp32 on the CPU (on CUDA aecli runs in TF32; the cuda tests
    # compare the two devices)
    result = encode_native(cli, tmp_path, "--scaled", "-o", z_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    latents = read_latents(z_path)
    assert latents.scaling.scale == pytest.approx(0.18215)
    x = torch.from_numpy(np.array(Image.open(images[0]))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert latents.latents.shape == (2, 4, 24, 32)
    assert (latents.latents[0] - mean[0] * vae.config.scaling_factor).abs().max() < 1e-3
    result = cli("decode", tmp_path / "vae", z_path, "-o", tmp_path / "dec", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        expected = ((vae.decode(mean).sample[0].clamp(-1, 1) + 1) * 127.5).round()
    decoded = torch.from_numpy(np.array(Image.open(tmp_path / "dec" / "photo0.png"))).permute(
        2, 0, 1
    )
    assert (decoded.float() - expected).abs().max() <= 2


def test_decode_scaled_npy_needs_the_flag(tmp_path, cli):
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    photos(tmp_path / "photos")
    encode_native(cli, tmp_path, "-o", tmp_path / "z.npy")
    encode_native(cli, tmp_path, "--scaled", "-o", tmp_path / "zs.npy")
    assert cli("decode", tmp_path / "vae", tmp_path / "z.npy", "-o", tmp_path / "a").exit_code == 0
    assert (
        cli(
            "decode", tmp_path / "vae", tmp_path / "zs.npy", "-o", tmp_path / "b", "--scaled"
        ).exit_code
        == 0
    )
    for name in ("000000.png", "000001.png"):  # a .npy carries no file names
        a = np.array(Image.open(tmp_path / "a" / name)).astype(int)
        b = np.array(Image.open(tmp_path / "b" / name)).astype(int)
        assert np.abs(a - b).max() <= 1


def test_encode_native_refuses_mixed_sizes(tmp_path, cli):
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    photos(tmp_path / "photos")
    photos(tmp_path / "photos" / "big", size=(64, 64))
    result = encode_native(cli, tmp_path, "-o", tmp_path / "z.npy")
    assert result.exit_code == 2
    assert "one latent file holds latents of one shape; write a latent folder" in result.output


def test_init_fine_tunes_a_vae_decoder(tmp_path, cli):
    """train --init from a diffusers folder with the encoder frozen: the encoder stays exactly
    as it was, the decoder moves, and the run says what it loaded."""
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    result = cli(
        "train", "--init", tmp_path / "vae", "--out", out, "--epochs", "1",
        "--set", "data.builtin_count=32", "--set", "train.freeze=encoder", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Initialised from" in result.output and "all 124 tensors" in result.output
    before, _ = load_weights(tmp_path / "vae")
    after, _ = load_weights(out / "model.safetensors")
    a, b = before.state_dict(), after.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("decoder."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))


def test_init_refuses_another_architecture(tmp_path, cli, tiny_preset):
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    result = cli("train", tiny_preset, "--init", tmp_path / "vae", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "--init: another architecture than this preset's" in result.output
    assert not (tmp_path / "run").exists()


def test_scaling_overrides_must_be_sound(tmp_path):
    from aecli.inference import Predictor

    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    predictor = Predictor(tmp_path / "vae", "cpu")
    assert predictor.latent_scaling(0.5).scale == 0.5
    with pytest.raises(UsageError, match="--scaling-factor must be a positive number"):
        predictor.latent_scaling(0.0)


def test_sampling_a_vae_with_scaling_factors_uses_their_spread(tmp_path, cli):
    """An SD VAE's latents have a spread of about 1 / scaling_factor, not N(0, I)'s."""
    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "z.safetensors"
    result = cli("sample", tmp_path / "vae", "-n", "16", "--seed", "1", "--latents-out", out)
    assert result.exit_code == 0, result.output
    z = read_latents(out).latents
    assert abs(z.std().item() * vae.config.scaling_factor - 1) < 0.1


def test_slerp_turns_around_the_shift_of_a_flux_style_vae(tmp_path):
    from aecli.inference import Predictor
    from aecli.inference.generate import prior, slerp_center

    vae = make_vae(**FLUX_STYLE)
    vae.register_to_config(shift_factor=0.1159)
    vae.save_pretrained(tmp_path / "vae")
    predictor = Predictor(tmp_path / "vae", "cpu")
    center = slerp_center(predictor)
    assert center.shape == (16, 1, 1) and torch.allclose(center, torch.tensor(0.1159))
    assert torch.allclose(prior(predictor).mean, torch.tensor(0.1159, dtype=torch.float64))


HOSTILE_CONFIGS = {
    "huge layers": ({"layers_per_block": 1_000_000_000}, "layers_per_block: 1000000000 is not"),
    "many levels": ({"block_out_channels": [32] * 20_000}, "a list of 1 to 8 widths"),
    "deep layers": ({"layers_per_block": 2000}, "layers_per_block: 2000 is not from 1 to 16"),
    "fraction": ({"latent_channels": 4.5}, "latent_channels: 4.5 is not a whole number"),
    "string": ({"layers_per_block": "2"}, "layers_per_block: '2' is not a whole number"),
    "wide": (
        {
            "block_out_channels": [8192] * 8,
            "down_block_types": ["DownEncoderBlock2D"] * 8,
            "up_block_types": ["UpDecoderBlock2D"] * 8,
            "norm_num_groups": 32,
        },
        "parameters; aecli builds at most",
    ),
    "nan": ({"scaling_factor": float("nan")}, "scaling_factor"),
    "overflow": ({"scaling_factor": 10**400}, "scaling_factor"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS), ids=list(HOSTILE_CONFIGS))
def test_a_hostile_config_json_is_refused_before_anything_is_built(tmp_path, case):
    """Sizes a config.json asks for are bounded before any structure of their size exists; run
    under a 6 GiB address-space limit, so that a regression fails here instead of taking the
    machine (layers_per_block 1e9 once grew a process to 19 GB)."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "vae"
    make_vae().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    changes, expected = HOSTILE_CONFIGS[case]
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))"
    ran = subprocess.run(
        [sys.executable, "-c", f"{limit}\nfrom aecli.cli import main; main()", "info", str(folder)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1 and expected in ran.stderr
    assert "internal error" not in ran.stderr


def test_deeply_nested_json_is_one_line(tmp_path, cli):
    folder = tmp_path / "vae"
    make_vae().save_pretrained(folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    result = cli("info", folder)
    assert result.exit_code == 2 and "unreadable JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_vae_in_float64_is_named_plainly(tmp_path, cli):
    make_vae().double().save_pretrained(tmp_path / "vae")
    result = cli("info", tmp_path / "vae")
    assert result.exit_code == 2
    assert "is F64; aecli reads VAE weights stored as F32, F16 or BF16" in result.stderr
    assert "floating point" not in result.stderr

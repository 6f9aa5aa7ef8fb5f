"""The TAESD family (diffusers AutoencoderTiny) in aecli: folders read and compared with
diffusers' own class in fp32, every command, exact tiles, export back, fine-tuning, bad input."""

from __future__ import annotations

import json
import os

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

SMALL = dict(
    encoder_block_out_channels=(16, 16, 16, 16),
    decoder_block_out_channels=(32, 32, 32, 32),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
)


def make_tiny(seed: int = 0, **overrides):
    """A random diffusers AutoencoderTiny at test size, every weight moved off its initial
    value so that a wrongly mapped tensor shows."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderTiny(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.fixture
def tiny(tmp_path):
    vae = make_tiny()
    vae.save_pretrained(tmp_path / "vae")
    return vae


def test_encode_and_decode_equal_diffusers(tmp_path, tiny):
    """aecli takes images in [0, 1] (diffusers maps its [-1, 1] to that inside) and decodes to
    [0, 1]; the latents are diffusers' to 1e-4 of their range, images within one 8-bit level."""
    model, info = load_weights(tmp_path / "vae")
    assert info.preset == "AutoencoderTiny (diffusers folder)"
    assert not model.variational
    torch.manual_seed(1)
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        reference = tiny.encode(x * 2 - 1).latents
        latents = model.encode(x).mode()
        spread = (reference.max() - reference.min()).item()
        assert latents.shape == reference.shape == (2, 4, 5, 7)
        assert (latents - reference).abs().max().item() <= 1e-4 * spread
        z = torch.randn_like(reference) * 4  # past the decoder's tanh clamp at 3
        levels = ((model.decode(z) - (tiny.decode(z).sample + 1) / 2).abs().max() * 255).item()
    assert levels <= 1


def test_info_shows_the_family_and_its_convention(tmp_path, tiny, cli):
    result = cli("info", tmp_path / "vae", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "AutoencoderTiny" and facts["deterministic"]
    assert facts["latent_shape"] == [4, 64, 64]  # at 512x512, as TAESD pairs with SD 1.x
    convention = facts["latent_convention"]
    assert (convention["kind"], convention["scale"], convention["shift"]) == ("affine", 1.0, 0.0)
    result = cli("info", tmp_path / "vae")
    assert "AutoencoderTiny (TAESD" in result.stdout and "scale 1" in result.stdout


def test_the_commands_on_a_tiny_folder(tmp_path, tiny, cli):
    """encode (file and folder), --scaled with the config's factors, decode, reconstruct,
    interpolate and diff, the figures against diffusers."""
    vae = tmp_path / "vae"
    images = photos(tmp_path / "photos")
    config = json.loads((vae / "config.json").read_text())
    config["scaling_factor"], config["shift_factor"] = 0.5, 0.25
    (vae / "config.json").write_text(json.dumps(config))
    common = ("--size", "native", "--device", "cpu")
    result = cli("encode", vae, tmp_path / "photos", "-o", tmp_path / "z.safetensors", *common)
    assert result.exit_code == 0, result.output
    plain = read_latents(tmp_path / "z.safetensors").latents
    x = torch.stack([image_chw(p) for p in images]) / 127.5 - 1
    with torch.no_grad():
        reference = tiny.encode(x).latents
        expected = ((tiny.decode(reference).sample.clamp(-1, 1) + 1) * 127.5).round()
    spread = (reference.max() - reference.min()).item()
    assert plain.shape == (2, 4, 6, 8)
    assert (plain - reference).abs().max().item() <= 1e-4 * spread
    out = tmp_path / "zs.safetensors"
    result = cli("encode", vae, tmp_path / "photos", "--scaled", "-o", out, *common)
    assert result.exit_code == 0, result.output
    scaled = read_latents(out)
    assert (scaled.scaling.scale, scaled.scaling.shift) == (0.5, 0.25)
    assert torch.allclose(scaled.latents, (reference - 0.25) * 0.5, atol=1e-4 * spread)
    # decode undoes the recorded scaling; within one 8-bit level of diffusers' decode
    result = cli("decode", vae, out, "-o", tmp_path / "dec", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for i, path in enumerate(images):
        assert (image_chw(tmp_path / "dec" / path.name) - expected[i]).abs().max() <= 1
    check_folder_and_commands(cli, vae, images, expected, tmp_path, *common)


def test_sample_and_encode_sample_say_it_is_deterministic(tmp_path, tiny, cli):
    photos(tmp_path / "photos")
    result = cli("encode", tmp_path / "vae", tmp_path / "photos", "--sample", "-o",
                 tmp_path / "z.npy")  # fmt: skip
    assert result.exit_code == 2
    assert "this model, an AutoencoderTiny (TAESD" in result.stderr
    assert "is deterministic" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = cli("sample", tmp_path / "vae", "-n", "2", "-o", tmp_path / "s.png")
    assert result.exit_code == 2
    assert "is deterministic and has no prior to sample from" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_exact_tiles_equal_untiled(tmp_path, tiny):
    """Tiles of 128 on a 500x372 image: the latents within 1e-3 of their range, the image at
    least 50 dB from untiled; a tile too small for the context is refused."""
    check_exact_tiles(tmp_path / "vae", smallest_refused=16)


def test_automatic_tiling_where_an_image_does_not_fit(tmp_path, tiny, monkeypatch):
    check_automatic_tiling(tmp_path / "vae", monkeypatch)


def test_export_loads_back_in_diffusers(tmp_path, tiny, cli):
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "out", "--format", "diffusers")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "out").eval()
    reference = tiny.state_dict()
    assert set(again.state_dict()) == set(reference)
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    for key, value in tiny.config.items():
        if not key.startswith("_"):
            plain = list(value) if isinstance(value, tuple) else value
            assert again.config[key] == plain, key
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "t.safetensors", "--format",
                 "single-file")  # fmt: skip
    assert result.exit_code == 2
    assert "aecli writes AutoencoderTiny" in result.stderr and "--format diffusers" in result.stderr


def test_init_fine_tunes_the_decoder_and_exports_it(tmp_path, tiny, cli):
    """train --init from the folder with the encoder frozen: the encoder stays exactly as it
    was, the decoder moves, and the result exports as an AutoencoderTiny again."""
    out = tmp_path / "run"
    after = fine_tune_frozen_encoder(cli, tmp_path / "vae", out)
    result = cli("export", out / "model.safetensors", "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "tuned").eval()
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32)
        assert (after.encode(x).mode() - again.encode(x * 2 - 1).latents).abs().max() <= 1e-4
        z = torch.randn(1, 4, 4, 4)
        assert (after.decode(z) * 2 - 1 - again.decode(z).sample).abs().max() <= 1e-4


def test_another_class_lists_the_families(tmp_path, cli):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX"}))
    result = cli("info", tmp_path)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "a diffusers AutoencoderKLCogVideoX; aecli reads AutoencoderKL" in result.stderr
    assert "AutoencoderTiny (TAESD, TAESDXL, TAESD3, TAEF1)" in result.stderr


def test_a_missing_or_misshapen_tensor_names_the_key_and_the_family(tmp_path, tiny):
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    missing = {k: v for k, v in tensors.items() if k != "decoder.layers.2.conv.4.bias"}
    save_file(missing, path)
    with pytest.raises(WeightsError, match=r"missing tensor decoder\.layers\.2\.conv\.4\.bias "
                       r"for its AutoencoderTiny layout"):  # fmt: skip
        load_weights(tmp_path / "vae")
    wrong = {**tensors, "encoder.layers.0.bias": torch.zeros(5)}
    save_file(wrong, path)
    with pytest.raises(WeightsError, match=r"encoder\.layers\.0\.bias has shape \[5\], its "
                       r"AutoencoderTiny layout needs \[16\]"):  # fmt: skip
        load_weights(tmp_path / "vae")


HOSTILE = {
    "many blocks": ({"num_encoder_blocks": [1, 1, 1, 10**9]}, "num_encoder_blocks: 1000000000"),
    "many levels": (
        {"encoder_block_out_channels": [16] * 9000, "num_encoder_blocks": [1] * 9000},
        "a list of 1 to 8 numbers",
    ),
    "wide": (
        {
            "encoder_block_out_channels": [8192] * 8,
            "num_encoder_blocks": [16] * 8,
            "decoder_block_out_channels": [8192] * 8,
            "num_decoder_blocks": [16] * 8,
        },
        "parameters; aecli builds at most",
    ),
    "widths": ({"encoder_block_out_channels": [16, 32, 16, 16]}, "one width for every level"),
    "no round trip": ({"upsampling_scaling_factor": 4}, "the decoder upsamples 64x"),
    "nan": ({"scaling_factor": float("nan")}, "scaling_factor"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_config_json_is_one_line(tmp_path, tiny, cli, case):
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    changes, expected = HOSTILE[case]
    config.update(changes)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    result = cli("info", tmp_path / "vae")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def taesd_files(vae, folder, name: str = "taesd") -> tuple:
    """TAESD's own encoder and decoder files of a diffusers model: diffusers' conversion
    (scripts/convert_tiny_autoencoder_to_diffusers.py: `encoder.layers.` + the key; the
    decoder's index less one, its clamp being module 0) inverted."""
    encoder, decoder = {}, {}
    for key, tensor in vae.state_dict().items():
        part, _, index, rest = key.split(".", 3)
        if part == "encoder":
            encoder[f"{index}.{rest}"] = tensor.contiguous()
        else:
            decoder[f"{int(index) + 1}.{rest}"] = tensor.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}_encoder.safetensors", folder / f"{name}_decoder.safetensors"
    save_file(encoder, paths[0])
    save_file(decoder, paths[1])
    return paths


@pytest.mark.parametrize("latent", [4, 16], ids=["taesd", "taef1"])
def test_taesd_files_are_read_from_either_half(tmp_path, latent):
    vae = make_tiny(latent_channels=latent, num_encoder_blocks=(1, 2, 1, 1))
    encoder, decoder = taesd_files(vae, tmp_path / "approx")
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 48)
    for path in (encoder, decoder):
        model, info = load_weights(path)
        assert info.preset == "AutoencoderTiny (taesd keys)"
        latent_config = info.config.model.latent
        assert (latent_config.scaling_factor, latent_config.shift_factor) == (1.0, 0.0)
        with torch.no_grad():
            assert (model.encode(x).mode() - vae.encode(x * 2 - 1).latents).abs().max() <= 1e-5
            z = torch.randn(1, latent, 4, 6) * 3
            assert (model.decode(z) * 2 - 1 - vae.decode(z).sample).abs().max() <= 1e-5


def test_a_taesd_file_without_its_other_half_is_one_line(tmp_path, cli):
    encoder, decoder = taesd_files(make_tiny(), tmp_path)
    decoder.unlink()
    result = cli("info", encoder)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "a TAESD encoder file; aecli reads it with its decoder" in result.stderr
    assert "taesd_decoder.safetensors" in result.stderr
    tensors = load_file(encoder)
    del tensors["1.conv.2.bias"]
    save_file(tensors, encoder)
    taesd_files(make_tiny(), tmp_path / "other")[1].rename(decoder)
    result = cli("info", encoder)
    assert result.exit_code == 2
    assert "missing tensor encoder.1.conv.2.bias for its AutoencoderTiny layout" in result.stderr


def test_taesd_pth_files_are_read_without_running_code(tmp_path, cli):
    """TAESD's released .pth files load through torch.load(weights_only=True): equal to the
    .safetensors pair. A .pth whose pickle would call a function, or one that is not TAESD's,
    is refused in one line, and the function never runs."""
    vae = make_tiny()
    paths = taesd_files(vae, tmp_path / "st")
    for path in paths:
        torch.save(load_file(path), tmp_path / path.with_suffix(".pth").name)
    from_pth, info = load_weights(tmp_path / "taesd_decoder.pth")
    from_st, _ = load_weights(paths[0])
    assert info.preset == "AutoencoderTiny (taesd keys)"
    for key, tensor in from_st.state_dict().items():
        assert torch.equal(from_pth.state_dict()[key], tensor), key
    result = cli("info", tmp_path / "taesd_encoder.pth")
    assert result.exit_code == 0, result.output
    assert "AutoencoderTiny" in result.stdout

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"0.weight": Payload()}, tmp_path / "evil_encoder.pth")
    result = cli("info", tmp_path / "evil_encoder.pth")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a weights-only torch file" in result.stderr
    assert not marker.exists()
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pth")
    result = cli("info", tmp_path / "other.pth")
    assert result.exit_code == 2
    assert "not one of TAESD's encoder or decoder files" in result.stderr

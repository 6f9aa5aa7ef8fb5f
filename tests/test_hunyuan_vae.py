"""HunyuanImage 2.1's VAE (diffusers AutoencoderKLHunyuanImage) in aecli: folders read and
compared with diffusers' own class, the pipelines' latent convention (z * scaling_factor) for
--scaled, every command, exact tiles, export back, fine-tuning, bad input."""

from __future__ import annotations

import json
from pathlib import Path

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

# f8 with 16 latent channels: the down blocks average groups of 4, 2 and 4 channels, the up
# blocks repeat 4, 2 and 4 times, the encoder's output averages pairs and the decoder's input
# repeats each latent channel 4 times
SMALL = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    spatial_compression_ratio=8,
    sample_size=64,
    scaling_factor=0.75289,
)
# f4, two residual blocks per level, 8 latent channels (the encoder's output averages groups of
# 4, the decoder's input repeats 8 times)
DEEPER = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    latent_channels=8,
    spatial_compression_ratio=4,
)


def make_hunyuan(seed: int = 0, **overrides):
    """A random diffusers AutoencoderKLHunyuanImage at test size, every weight moved off its
    initial value so that a wrongly mapped tensor shows."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLHunyuanImage(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.fixture
def hunyuan(tmp_path):
    vae = make_hunyuan()
    vae.save_pretrained(tmp_path / "vae")
    return vae


@pytest.mark.parametrize("overrides", [{}, DEEPER], ids=["f8", "f4-deeper"])
def test_encode_and_decode_equal_diffusers(tmp_path, overrides):
    """The posterior mode (and log-variance) within 1e-4 of its range, images within one 8-bit
    level."""
    vae = make_hunyuan(**overrides)
    vae.save_pretrained(tmp_path / "vae")
    model, info = load_weights(tmp_path / "vae")
    assert info.preset == "AutoencoderKLHunyuanImage (diffusers folder)"
    assert model.variational
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        reference = posterior.mode()
        mine = model.encode(x)
        spread = (reference.max() - reference.min()).item()
        factor = vae.config.spatial_compression_ratio
        assert mine.mode().shape == reference.shape == (2, vae.config.latent_channels,
                                                         48 // factor, 64 // factor)  # fmt: skip
        assert (mine.mode() - reference).abs().max().item() <= 1e-4 * spread
        logvar_spread = (posterior.logvar.max() - posterior.logvar.min()).item()
        assert (mine.logvar - posterior.logvar).abs().max().item() <= 1e-4 * logvar_spread
        levels = (model.decode(reference) - vae.decode(reference).sample).abs().max() * 127.5
    assert levels.item() <= 1


def test_info_shows_the_family_and_its_convention(tmp_path, hunyuan, cli):
    result = cli("info", tmp_path / "vae", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "AutoencoderKLHunyuanImage" and not facts["deterministic"]
    assert facts["latent_shape"] == [16, 8, 8]  # sample_size 64 at f8
    convention = facts["latent_convention"]
    assert (convention["kind"], convention["scale"], convention["shift"]) == (
        "affine",
        0.75289,
        0.0,
    )
    result = cli("info", tmp_path / "vae")
    assert "AutoencoderKLHunyuanImage (the HunyuanImage 2.1 VAE" in result.stdout
    assert "HunyuanImage 2.1 pipelines" in result.stdout


def test_the_commands_on_a_hunyuan_folder(tmp_path, hunyuan, cli):
    """encode (file and folder), --scaled as the HunyuanImage pipelines (z * scaling_factor),
    decode (undoing it), reconstruct, interpolate, diff and sample, the figures against
    diffusers."""
    vae = tmp_path / "vae"
    images = photos(tmp_path / "photos")
    common = ("--size", "native", "--device", "cpu")
    result = cli("encode", vae, tmp_path / "photos", "-o", tmp_path / "z.safetensors", *common)
    assert result.exit_code == 0, result.output
    plain = read_latents(tmp_path / "z.safetensors").latents
    x = torch.stack([image_chw(p) for p in images]) / 127.5 - 1
    with torch.no_grad():
        reference = hunyuan.encode(x).latent_dist.mode()
        expected = ((hunyuan.decode(reference).sample.clamp(-1, 1) + 1) * 127.5).round()
    # HunyuanImageRefinerPipeline: image_latents * vae.config.scaling_factor;
    # HunyuanImagePipeline decodes latents / vae.config.scaling_factor
    pipeline = reference * hunyuan.config.scaling_factor
    spread = (reference.max() - reference.min()).item()
    assert plain.shape == (2, 16, 6, 8)
    assert (plain - reference).abs().max().item() <= 1e-4 * spread
    out = tmp_path / "zs.safetensors"
    result = cli("encode", vae, tmp_path / "photos", "--scaled", "-o", out, *common)
    assert result.exit_code == 0, result.output
    scaled = read_latents(out)
    assert (scaled.scaling.scale, scaled.scaling.shift) == (0.75289, 0.0)
    assert (scaled.latents - pipeline).abs().max().item() <= 1e-4 * spread
    # decode undoes the recorded scaling: as decoding the raw latents, and diffusers'
    for name, latents in (("raw", tmp_path / "z.safetensors"), ("scaled", out)):
        result = cli("decode", vae, latents, "-o", tmp_path / name, "--device", "cpu")
        assert result.exit_code == 0, result.output
    for i, path in enumerate(images):
        assert (image_chw(tmp_path / "scaled" / path.name) - expected[i]).abs().max() <= 1
        assert (image_chw(tmp_path / "raw" / path.name) - expected[i]).abs().max() <= 1
    check_folder_and_commands(cli, vae, images, expected, tmp_path, "--scaled", *common)
    result = cli("sample", vae, "-n", "2", "-o", tmp_path / "s.png", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_exact_tiles_equal_untiled(tmp_path, hunyuan):
    """Tiles of 128 on a 500x372 image: the latents within 1e-3 of their range, the image at
    least 50 dB from untiled."""
    check_exact_tiles(tmp_path / "vae")


def test_automatic_tiling_where_an_image_does_not_fit(tmp_path, hunyuan, monkeypatch):
    check_automatic_tiling(tmp_path / "vae", monkeypatch)


def test_export_loads_back_in_diffusers(tmp_path, cli):
    """diffusers reads the exported folder (through aecli's own weights file) with equal
    tensors and an equal config; the single file holds the original layout."""
    vae = make_hunyuan(**DEEPER)
    vae.save_pretrained(tmp_path / "vae")
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "w.safetensors", "--format", "aecli")
    assert result.exit_code == 0, result.output
    result = cli("export", tmp_path / "w.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKLHunyuanImage.from_pretrained(tmp_path / "out").eval()
    reference = vae.state_dict()
    assert set(again.state_dict()) == set(reference)
    for key, tensor in again.state_dict().items():
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
    for key, value in vae.config.items():
        if not key.startswith("_"):
            plain = list(value) if isinstance(value, tuple) else value
            assert again.config[key] == plain, key
    # the single file: the original keys, as the inverted conversion names them
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "f.safetensors", "--format",
                 "single-file")  # fmt: skip
    assert result.exit_code == 0, result.output
    written, original = load_file(tmp_path / "f.safetensors"), original_tensors(vae)
    assert set(written) == set(original)
    assert all(torch.equal(written[k], original[k]) for k in original)


def test_init_fine_tunes_the_decoder_and_exports_it(tmp_path, hunyuan, cli):
    """train --init with the encoder frozen: the encoder stays exactly as it was, the decoder
    moves, and the result exports as an AutoencoderKLHunyuanImage again."""
    out = tmp_path / "run"
    after = fine_tune_frozen_encoder(cli, tmp_path / "vae", out)
    result = cli("export", out / "model.safetensors", "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderKLHunyuanImage.from_pretrained(tmp_path / "tuned").eval()
    assert again.config.scaling_factor == 0.75289
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert (after.encode(x).mode() - again.encode(x).latent_dist.mode()).abs().max() <= 1e-4
        z = torch.randn(1, 16, 4, 4)
        assert (after.decode(z) - again.decode(z).sample).abs().max() <= 1e-4


def test_a_missing_or_misshapen_tensor_names_the_key_and_the_family(tmp_path, hunyuan):
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    key = "encoder.down_blocks.1.conv.bias"  # the first down block's convolution
    save_file({k: v for k, v in tensors.items() if k != key}, path)
    with pytest.raises(WeightsError, match=r"missing tensor encoder\.down_blocks\.1\.conv\.bias "
                       r"for its AutoencoderKLHunyuanImage layout"):  # fmt: skip
        load_weights(tmp_path / "vae")
    save_file({**tensors, "decoder.up_blocks.2.conv.weight": torch.zeros(64, 64, 3, 3)}, path)
    with pytest.raises(WeightsError, match=r"decoder\.up_blocks\.2\.conv\.weight has shape "
                       r"\[64, 64, 3, 3\], its AutoencoderKLHunyuanImage layout needs "
                       r"\[256, 64, 3, 3\]"):  # fmt: skip
        load_weights(tmp_path / "vae")


HOSTILE = {
    "wide": (
        {"block_out_channels": [8192] * 8, "layers_per_block": 16},
        "parameters; aecli builds at most",
    ),
    "many levels": ({"block_out_channels": [64] * 9000}, "a list of 1 to 8 widths"),
    "many layers": ({"layers_per_block": 10**9}, "layers_per_block: 1000000000"),
    "groups": ({"block_out_channels": [32, 48, 64, 64]}, "a multiple of 32"),
    "latent": ({"latent_channels": 48}, "a multiple of twice latent_channels"),
    "resnet width": (
        {"downsample_match_channel": False},
        "HunyuanImageResnetBlock cannot run",
    ),
    "down block": ({"block_out_channels": [32, 32, 160, 160]}, "HunyuanImageDownsample needs"),
    "flag": ({"upsample_match_channel": "yes"}, "upsample_match_channel: yes is not true"),
    "nan": ({"scaling_factor": float("nan")}, "scaling_factor"),
    "negative scale": ({"scaling_factor": -0.5}, "scaling_factor: -0.5 is not positive"),
    "no size": ({"sample_size": None}, "sample_size"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_config_json_is_one_line(tmp_path, hunyuan, cli, case):
    """Refused from config.json alone, before anything is built, in one line."""
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    changes, expected = HOSTILE[case]
    config.update(changes)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    result = cli("info", tmp_path / "vae")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_a_missing_key_is_one_line(tmp_path, hunyuan, cli):
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    del config["layers_per_block"]
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    result = cli("info", tmp_path / "vae")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "unusable AutoencoderKLHunyuanImage config (lacks 'layers_per_block')" in result.stderr


def test_flop_arithmetic_is_what_torch_s_flop_counter_counts():
    """The registry's FLOPs of every HunyuanImage block are what FlopCounterMode counts on the
    meta device, and the whole forward pass's too."""
    from torch.utils.flop_counter import FlopCounterMode

    from aecli.io.vae_hunyuan import HunyuanLayout
    from aecli.models import build_model, forward_flops
    from aecli.models.builder import layers

    layout = HunyuanLayout(3, 3, 16, (32, 32, 64, 64), 1, 8, sample_size=64)
    config = layout.config()
    model = build_model(config, meta=True)
    x = torch.empty(1, *model.input_shape, device="meta")
    for layer, module in zip(layers(config), [*model.encoder, model.latent_head, *model.decoder],
                             strict=True):  # fmt: skip
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = module(x)
        assert counter.get_total_flops() == layer.flops, (layer.part, layer.spec)
        x = x.new_empty(1, *layer.output) if layer.part == "latent" else y
        assert tuple(x.shape[1:]) == layer.output, (layer.part, layer.spec)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, *model.input_shape, device="meta"), sample=False)
    assert forward_flops(config) == counter.get_total_flops() > 0


def test_the_layout_of_its_own_config_is_itself():
    """An aecli config made from a layout is recognised as that layout (what export and
    `aecli info` ask), and one block changed names the block."""
    from aecli.io.vae_families import family_of
    from aecli.io.vae_hunyuan import HunyuanLayout, layout_of_config

    for layout in (
        HunyuanLayout(3, 3, 16, (32, 32, 64, 64), 1, 8, sample_size=64, scaling_factor=0.5),
        HunyuanLayout(3, 3, 8, (32, 64, 64), 2, 4, sample_size=128),
        HunyuanLayout(1, 1, 32, (64,), 0, 1, sample_size=32),
    ):
        config = layout.config()
        assert layout_of_config(config) == (layout, "")
        family, found = family_of(config)
        assert family.name == "AutoencoderKLHunyuanImage" and found == layout
    raw = HunyuanLayout(3, 3, 16, (32, 32, 64, 64), 1, 8, sample_size=64).raw_config()
    raw["model"]["decoder"][5]["out"] = 32
    from aecli.config import config_from_dict

    found, why = layout_of_config(config_from_dict(raw, "test"))
    assert found is None and why.startswith("model.decoder.5 is resblock out=32")


def original_tensors(vae) -> dict[str, torch.Tensor]:
    """A diffusers model's tensors under the original (hyimage, ComfyUI) names: diffusers'
    scripts/convert_hunyuan_image_to_diffusers.py (convert_hunyuan_image_vae_checkpoint_to_
    diffusers, 0.35) inverted. Per level: its residual blocks (one more in the decoder), then
    its down or up block if it has one, numbered in order in diffusers, by level in the
    original; the mid blocks' and attention's own names."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanimage import (
        HunyuanImageResnetBlock,
    )

    renames = {}
    for part, flat, level_name, resampler, extra in (
        ("encoder", "down_blocks", "down", "downsample", 0),
        ("decoder", "up_blocks", "up", "upsample", 1),
    ):
        modules = list(getattr(getattr(vae, part), flat))
        k = 0
        for level in range(len(vae.config.block_out_channels)):
            for j in range(vae.config.layers_per_block + extra):
                assert isinstance(modules[k], HunyuanImageResnetBlock)
                renames[f"{part}.{flat}.{k}."] = f"{part}.{level_name}.{level}.block.{j}."
                k += 1
            if k < len(modules) and not isinstance(modules[k], HunyuanImageResnetBlock):
                renames[f"{part}.{flat}.{k}."] = f"{part}.{level_name}.{level}.{resampler}."
                k += 1
        renames[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        renames[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        for new, old in (("norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                         ("proj", "proj_out")):  # fmt: skip
            renames[f"{part}.mid_block.attentions.0.{new}."] = f"{part}.mid.attn_1.{old}."
    found = {}
    for key, tensor in vae.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        name = key if prefix is None else renames[prefix] + key[len(prefix) :]
        found[name] = tensor.contiguous()
    return found


@pytest.mark.parametrize(
    ("overrides", "scale"),
    [({}, 1.0), (dict(block_out_channels=(32, 128), latent_channels=64,
                      spatial_compression_ratio=2), 0.75289)],
    ids=["f8", "release-64-channels"],
)  # fmt: skip
def test_a_single_file_in_the_original_layout_is_recognised(tmp_path, overrides, scale):
    """A safetensors file of the original keys (ComfyUI's HunyuanImage 2.1 VAE file), no
    config.json: recognised from its keys and shapes, equal to diffusers; a 64-channel latent
    takes the release's scaling factor."""
    vae = make_hunyuan(**overrides)
    save_file(original_tensors(vae), tmp_path / "hunyuan_image_2.1_vae.safetensors")
    model, info = load_weights(tmp_path / "hunyuan_image_2.1_vae.safetensors")
    assert info.preset == "AutoencoderKLHunyuanImage (original keys)"
    assert info.config.model.latent.scaling_factor == scale
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        reference = vae.encode(x).latent_dist.mode()
        spread = (reference.max() - reference.min()).item()
        assert (model.encode(x).mode() - reference).abs().max().item() <= 1e-4 * spread
        levels = (model.decode(reference) - vae.decode(reference).sample).abs().max() * 127.5
    assert levels.item() <= 1


def test_a_misshapen_original_file_names_the_key(tmp_path, cli):
    tensors = original_tensors(make_hunyuan())
    path = tmp_path / "vae.safetensors"
    save_file({**tensors, "decoder.up.0.upsample.conv.weight": torch.zeros(64, 64, 3, 3)}, path)
    result = cli("info", path)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert ("tensor decoder.up.0.upsample.conv.weight has shape [64, 64, 3, 3], its "
            "AutoencoderKLHunyuanImage layout needs [256, 64, 3, 3]") in result.stderr  # fmt: skip
    del tensors["decoder.conv_in.weight"]
    save_file(tensors, path)
    result = cli("info", path)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "missing tensor decoder.conv_in.weight for its AutoencoderKLHunyuanImage" in (
        result.stderr
    )


def test_latent_diffusion_files_are_not_taken_for_hunyuan():
    """AutoencoderKL's own single files share the original names (FLUX.1's has no quant_conv
    either): never read as this family's."""
    from aecli.io.vae_files import KLLayout
    from aecli.io.vae_hunyuan import layout_from_original
    from aecli.models import build_model

    for quant in (True, False):
        layout = KLLayout(3, 3, (32, 64, 64), 1, 16, quant_conv=quant, post_quant_conv=quant)
        state = build_model(layout.config(), meta=True).state_dict()
        shapes = {n.ldm: tuple(state[n.aecli].shape) for n in layout.names()}
        assert "decoder.up.1.upsample.conv.weight" in shapes
        assert layout_from_original(shapes, Path("kl.safetensors")) is None

"""DC-AE (diffusers AutoencoderDC: the SANA VAE, mit-han-lab's dc-ae releases) in aecli: folders
read and compared with diffusers' own class, the pipelines' latent convention (z *
scaling_factor) for --scaled, every command, exact tiles (the linear attention's sums gathered
over the whole tensor), export back, fine-tuning, bad input, and DC-AE's original checkpoints
(made by inverting diffusers' own conversion)."""

from __future__ import annotations

import json
import re

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

# SANA 1.0's layout at test size (f4): blocks at every level, strided-convolution downsampling,
# nearest upsampling, EfficientViT blocks with a 5x5 multi-scale q, k, v
SANA = dict(
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(16, 32, 32),
    decoder_block_out_channels=(16, 32, 32),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (5,), (5,)),
    decoder_qkv_multiscales=((), (5,), (5,)),
    downsample_block_type="conv",
    upsample_block_type="interpolate",
    scaling_factor=0.41407,
)
# the in-1.0 / mix-1.0 layout at test size (f4): no blocks at the first level (the encoder's
# input convolution pixel-unshuffles, the decoder's output convolution pixel-shuffles),
# BatchNorm and ReLU in the decoder's residual blocks, no multi-scale projection
IN_MIX = dict(
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 32),
    decoder_block_out_channels=(8, 16, 32),
    encoder_layers_per_block=(0, 1, 1),
    decoder_layers_per_block=(0, 2, 1),
    encoder_qkv_multiscales=((), (), ()),
    decoder_qkv_multiscales=((), (), ()),
    decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"),
    decoder_act_fns=("relu", "relu", "silu"),
    scaling_factor=0.3189,
)
# the rest of what diffusers builds: no shortcuts at the latent, two multi-scale kernels,
# attention heads that leave channels over (24 of 32, 48 of 64), BatchNorm after an attention,
# GELU
OTHER = dict(
    latent_channels=16,
    attention_head_dim=24,
    encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("EfficientViTBlock", "EfficientViTBlock", "ResBlock"),
    encoder_block_out_channels=(16, 32, 64),
    decoder_block_out_channels=(32, 32, 64),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 2),
    encoder_qkv_multiscales=((), (3, 5), (3,)),
    decoder_qkv_multiscales=((3,), (), ()),
    decoder_norm_types=("batch_norm", "rms_norm", "rms_norm"),
    decoder_act_fns=("silu", "silu", "gelu"),  # EfficientViT blocks have none of their own
    encoder_out_shortcut=False,
    decoder_in_shortcut=False,
    decoder_conv_act_fn="silu",
    scaling_factor=1.5,
)


def make_dc(seed: int = 0, **config):
    """A random diffusers AutoencoderDC at test size (SANA's layout unless given), every
    weight moved off its initial value and every BatchNorm given statistics far from (0, 1),
    so that a wrongly mapped tensor shows."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderDC(**(config or SANA)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for module in vae.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn_like(module.running_mean) * 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(3)
    return vae


@pytest.fixture
def dcae(tmp_path):
    vae = make_dc()
    vae.save_pretrained(tmp_path / "vae")
    return vae


def plain(config) -> dict:
    """A diffusers config as JSON writes it, every per-level value one per level."""
    found = json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    levels = len(found["encoder_block_out_channels"])
    for key in (
        "encoder_block_types",
        "decoder_block_types",
        "decoder_norm_types",
        "decoder_act_fns",
    ):
        if isinstance(found[key], str):
            found[key] = [found[key]] * levels
    return found


@pytest.mark.parametrize("config", [SANA, IN_MIX, OTHER], ids=["sana", "in-mix", "other"])
def test_encode_and_decode_equal_diffusers(tmp_path, config):
    """The latent within 1e-4 of its range, images within one 8-bit level; also on an image
    small enough that diffusers' attention takes its quadratic path."""
    vae = make_dc(**config)
    vae.save_pretrained(tmp_path / "vae")
    model, info = load_weights(tmp_path / "vae")
    assert info.preset == "AutoencoderDC (diffusers folder)"
    assert not model.variational
    torch.manual_seed(1)
    for shape in ((2, 3, 48, 64), (1, 3, 8, 8)):
        x = torch.rand(shape) * 2 - 1
        with torch.no_grad():
            reference = vae.encode(x).latent
            latents = model.encode(x).mode()
            spread = (reference.max() - reference.min()).item()
            assert latents.shape == reference.shape
            assert (latents - reference).abs().max().item() <= 1e-4 * spread
            levels = (model.decode(reference) - vae.decode(reference).sample).abs().max() * 127.5
        assert levels.item() <= 1


def test_info_shows_the_family_and_its_convention(tmp_path, dcae, cli):
    result = cli("info", tmp_path / "vae", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "AutoencoderDC" and facts["deterministic"]
    assert facts["latent_shape"] == [8, 256, 256]  # at 1024x1024, SANA's images
    convention = facts["latent_convention"]
    assert (convention["kind"], convention["scale"], convention["shift"]) == ("affine", 0.41407, 0)
    result = cli("info", tmp_path / "vae")
    assert "AutoencoderDC (DC-AE: the SANA VAE" in result.stdout
    assert "(z - 0) * 0.41407: SANA pipelines multiply" in result.stdout


def test_the_commands_on_a_dc_folder(tmp_path, cli):
    """encode (file and folder), --scaled as the SANA pipelines (z * scaling_factor), decode
    (undoing it), reconstruct, interpolate and diff, the figures against diffusers; on the
    in-1.0 / mix-1.0 layout."""
    dcae = make_dc(**IN_MIX)
    vae = tmp_path / "vae"
    dcae.save_pretrained(vae)
    images = photos(tmp_path / "photos")
    common = ("--size", "native", "--device", "cpu")
    result = cli("encode", vae, tmp_path / "photos", "-o", tmp_path / "z.safetensors", *common)
    assert result.exit_code == 0, result.output
    plain_latents = read_latents(tmp_path / "z.safetensors").latents
    x = torch.stack([image_chw(p) for p in images]) / 127.5 - 1
    with torch.no_grad():
        reference = dcae.encode(x).latent
        expected = ((dcae.decode(reference).sample.clamp(-1, 1) + 1) * 127.5).round()
    spread = (reference.max() - reference.min()).item()
    assert plain_latents.shape == (2, 8, 12, 16)
    assert (plain_latents - reference).abs().max().item() <= 1e-4 * spread
    out = tmp_path / "zs.safetensors"
    result = cli("encode", vae, tmp_path / "photos", "--scaled", "-o", out, *common)
    assert result.exit_code == 0, result.output
    scaled = read_latents(out)
    assert (scaled.scaling.scale, scaled.scaling.shift) == (0.3189, 0.0)
    pipeline = reference * dcae.config.scaling_factor  # SanaPipeline divides by it to decode
    assert (scaled.latents - pipeline).abs().max().item() <= 1e-4 * spread
    result = cli("decode", vae, out, "-o", tmp_path / "dec", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for i, path in enumerate(images):
        assert (image_chw(tmp_path / "dec" / path.name) - expected[i]).abs().max() <= 1
    check_folder_and_commands(cli, vae, images, expected, tmp_path, "--scaled", *common)


def test_sample_and_encode_sample_say_it_is_deterministic(tmp_path, dcae, cli):
    photos(tmp_path / "photos")
    result = cli(
        "encode", tmp_path / "vae", tmp_path / "photos", "--sample", "-o", tmp_path / "z.npy"
    )
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "this model, an AutoencoderDC (DC-AE" in result.stderr
    assert "is deterministic" in result.stderr
    result = cli("sample", tmp_path / "vae", "-n", "2", "-o", tmp_path / "s.png")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is deterministic and has no prior to sample from" in result.stderr


@pytest.mark.parametrize("config", [SANA, IN_MIX], ids=["sana", "in-mix"])
def test_exact_tiles_equal_untiled(tmp_path, config):
    """Tiles of 128 on a 500x372 image: the latents within 1e-3 of their range, the image at
    least 50 dB from untiled (every linear attention's sums gathered over the whole tensor); a
    tile too small for the context is refused."""
    make_dc(**config).save_pretrained(tmp_path / "vae")
    check_exact_tiles(tmp_path / "vae", smallest_refused=8)


def test_the_attention_s_sums_are_gathered_not_taken_per_tile(tmp_path):
    """The exact tiles' plan gathers each EfficientViT block's sums over its whole q, k, v
    tensor, as GroupNorm's moments are gathered (sums taken per tile, as --tile-fast's, would
    not give the untiled result)."""
    from aecli.inference import Predictor

    make_dc().save_pretrained(tmp_path / "vae")
    predictor = Predictor(tmp_path / "vae", "cpu")
    for part, blocks in (("encode", 2), ("decode", 2)):
        stats = predictor._plan(part).stats
        gathered = [s for s in stats.values() if "linear_attention" in s]
        assert len(gathered) == blocks


def test_automatic_tiling_where_an_image_does_not_fit(tmp_path, monkeypatch):
    make_dc(**IN_MIX).save_pretrained(tmp_path / "vae")
    check_automatic_tiling(tmp_path / "vae", monkeypatch, (120, 160))


@pytest.mark.parametrize("config", [SANA, IN_MIX, OTHER], ids=["sana", "in-mix", "other"])
def test_export_loads_back_in_diffusers(tmp_path, cli, config):
    """diffusers reads the exported folder (through aecli's own weights file) with equal
    tensors, BatchNorm statistics included, and an equal config."""
    dcae = make_dc(**config)
    dcae.save_pretrained(tmp_path / "vae")
    result = cli("export", tmp_path / "vae", "-o", tmp_path / "w.safetensors", "--format", "aecli")
    assert result.exit_code == 0, result.output
    result = cli("export", tmp_path / "w.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderDC.from_pretrained(tmp_path / "out").eval()
    reference = dcae.state_dict()
    assert set(again.state_dict()) == set(reference)
    for key, tensor in again.state_dict().items():
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
    assert plain(again.config) == plain(dcae.config)


def test_init_fine_tunes_the_decoder_and_exports_it(tmp_path, cli):
    """train --init from the folder with the encoder frozen: the encoder stays exactly as it
    was, the decoder moves (its BatchNorm statistics too), and the result exports as an
    AutoencoderDC again."""
    make_dc(**IN_MIX).save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    after = fine_tune_frozen_encoder(cli, tmp_path / "vae", out)
    result = cli("export", out / "model.safetensors", "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    again = diffusers.AutoencoderDC.from_pretrained(tmp_path / "tuned").eval()
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert (after.encode(x).mode() - again.encode(x).latent).abs().max() <= 1e-4
        z = torch.randn(1, 8, 8, 8)
        assert (after.decode(z) - again.decode(z).sample).abs().max() <= 1e-4


def test_a_missing_or_misshapen_tensor_names_the_key_and_the_family(tmp_path, dcae):
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    key = "decoder.up_blocks.1.1.attn.to_k.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, path)
    with pytest.raises(
        WeightsError,
        match=rf"missing tensor {re_key(key)} for its "
        r"AutoencoderDC layout",
    ):
        load_weights(tmp_path / "vae")
    save_file({**tensors, "encoder.conv_in.bias": torch.zeros(5)}, path)
    with pytest.raises(
        WeightsError,
        match=r"encoder\.conv_in\.bias has shape \[5\], its "
        r"AutoencoderDC layout needs \[16\]",
    ):
        load_weights(tmp_path / "vae")


def re_key(key: str) -> str:
    return key.replace(".", r"\.")


HOSTILE = {
    "many blocks": ({"encoder_layers_per_block": [1, 1, 10**9]}, "layers_per_block: 1000000000"),
    "many levels": ({"encoder_block_out_channels": [16] * 9000}, "a list of 1 to 8 widths"),
    "wide": (
        {
            key: value
            for part in ("encoder", "decoder")
            for key, value in (
                (f"{part}_block_out_channels", [8192] * 8),
                (f"{part}_layers_per_block", [16] * 8),
                (f"{part}_block_types", "ResBlock"),
                (f"{part}_qkv_multiscales", [[]] * 8),
            )
        }
        | {"decoder_norm_types": "rms_norm", "decoder_act_fns": "silu"},
        "parameters; aecli builds at most",
    ),
    "block type": (
        {"decoder_block_types": ["ResBlock", "Attention", "ResBlock"]},
        "decoder_block_types: 'Attention'",
    ),
    "per level": ({"decoder_layers_per_block": [1, 1]}, "decoder_layers_per_block: one per"),
    "norm": ({"decoder_norm_types": "layer_norm"}, "decoder_norm_types: 'layer_norm'"),
    "activation": ({"decoder_act_fns": "mish"}, "decoder_act_fns: 'mish'"),
    "upsample": ({"upsample_block_type": 7}, "upsample_block_type: '7' is not a block type's name"),
    "kernel": ({"encoder_qkv_multiscales": [[], [4], [5]]}, "kernel sizes must be odd"),
    "shortcut": ({"latent_channels": 12}, "latent_channels 12 does not divide"),
    "heads": ({"attention_head_dim": 64}, "fewer than attention_head_dim 64"),
    "nan": ({"scaling_factor": float("nan")}, "scaling_factor"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_config_json_is_one_line(tmp_path, dcae, cli, case):
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    changes, expected = HOSTILE[case]
    config.update(changes)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    result = cli("info", tmp_path / "vae")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr
    assert "AutoencoderDC" in result.stderr


def test_flop_arithmetic_is_what_torch_s_flop_counter_counts():
    """The registry's FLOPs of every DC-AE block are what FlopCounterMode counts on the meta
    device, and the whole forward pass's too."""
    from torch.utils.flop_counter import FlopCounterMode

    from aecli.io import vae_dc
    from aecli.models import build_model, forward_flops
    from aecli.models.builder import layers

    raw = {**OTHER, "downsample_block_type": "conv"}
    layout = vae_dc.layout_from_diffusers_config(json.loads(json.dumps(raw)), "config.json")
    config = layout.config().model_copy(
        update={"data": layout.config().data.model_copy(update={"image_size": 64})}
    )
    model = build_model(config, meta=True)
    x = torch.empty(1, *model.input_shape, device="meta")
    for layer, module in zip(
        layers(config), [*model.encoder, model.latent_head, *model.decoder], strict=True
    ):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = module(x)
        assert counter.get_total_flops() == layer.flops, (layer.part, layer.spec)
        x = x.new_empty(1, *layer.output) if layer.part == "latent" else y
        assert tuple(x.shape[1:]) == layer.output, (layer.part, layer.spec)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, *model.input_shape, device="meta"), sample=False)
    assert forward_flops(config) == counter.get_total_flops() > 0


@pytest.mark.parametrize("config", [SANA, IN_MIX, OTHER], ids=["sana", "in-mix", "other"])
def test_the_layout_of_its_own_config_is_itself(config):
    from aecli.io import vae_dc, vae_families

    raw = json.loads(json.dumps(dict(config)))
    layout = vae_dc.layout_from_diffusers_config(raw, "config.json")
    found, why = vae_dc.layout_of_config(layout.config())
    assert found == layout, why
    family, _ = vae_families.family_of(layout.config())
    assert family.name == "AutoencoderDC"


# -- DC-AE's original checkpoints --------------------------------------------------------------


def original_checkpoint(vae) -> dict[str, torch.Tensor]:
    """DC-AE's original checkpoint (efficientvit's DCAE state dict) of a diffusers model:
    diffusers' convert_autoencoder_dc_checkpoint_to_diffusers inverted, from efficientvit's
    module structure (a ResidualBlock wraps its block as `main.`, a ConvLayer its Conv2d as
    `conv.`, the attention's q, k and v are one `qkv` 1x1 convolution)."""
    config = vae.config
    unshuffle = config.downsample_block_type == "pixel_unshuffle"
    block = [
        (r"conv1\.", "main.conv1.conv."),
        (r"conv2\.", "main.conv2.conv."),
        (r"norm\.", "main.conv2.norm."),
        (r"attn\.to_qkv_multiscale\.(\d+)\.proj_in\.", r"context_module.main.aggreg.\1.0."),
        (r"attn\.to_qkv_multiscale\.(\d+)\.proj_out\.", r"context_module.main.aggreg.\1.1."),
        (r"attn\.to_out\.", "context_module.main.proj.conv."),
        (r"attn\.norm_out\.", "context_module.main.proj.norm."),
        (r"conv_out\.conv_inverted\.", "local_module.main.inverted_conv.conv."),
        (r"conv_out\.conv_depth\.", "local_module.main.depth_conv.conv."),
        (r"conv_out\.conv_point\.", "local_module.main.point_conv.conv."),
        (r"conv_out\.norm\.", "local_module.main.point_conv.norm."),
        (r"conv\.", "main.conv.conv." if unshuffle else "main.conv."),  # a down block
    ]
    found, qkv = {}, {}
    for key, tensor in vae.state_dict().items():
        level = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(\d+)\.(.+)", key)
        if level is None:
            shortcut = (
                config.encoder_out_shortcut
                if key.startswith("encoder")
                else config.decoder_in_shortcut
            )
            main = "main." if shortcut else ""
            renamed = {
                "encoder.conv_in.": "encoder.project_in.conv.",  # a convolution
                "encoder.conv_in.conv.": f"encoder.project_in.{'conv.' if unshuffle else ''}conv.",
                "encoder.conv_out.": f"encoder.project_out.{main}op_list.0.conv.",
                "decoder.conv_in.": f"decoder.project_in.{main}conv.",
                "decoder.norm_out.": "decoder.project_out.op_list.0.",
                "decoder.conv_out.": "decoder.project_out.op_list.2.conv.",
                "decoder.conv_out.conv.": "decoder.project_out.op_list.2.conv.conv.",
            }
            prefix = max((p for p in renamed if key.startswith(p)), key=len)
            found[renamed[prefix] + key[len(prefix) :]] = tensor
            continue
        part, _, stage, op, rest = level.groups()
        up = part == "decoder" and int(stage) < len(config.decoder_layers_per_block) - 1
        if up and op == "0":  # an up block (either kind holds a ConvLayer)
            found[f"decoder.stages.{stage}.op_list.0.main.conv.conv.{rest[5:]}"] = tensor
            continue
        head = f"{part}.stages.{stage}.op_list.{op}."
        projection = re.fullmatch(r"attn\.to_([qkv])\.weight", rest)
        if projection:
            qkv.setdefault(head, {})[projection.group(1)] = tensor
            continue
        pattern, replacement = next((p, r) for p, r in block if re.match(p, rest))
        renamed = re.sub(pattern, replacement, rest, count=1)
        if rest.startswith("attn.to_out."):
            tensor = tensor[..., None, None]
        found[head + renamed] = tensor
    for head, parts in qkv.items():
        weight = torch.cat([parts["q"], parts["k"], parts["v"]])[..., None, None]
        found[f"{head}context_module.main.qkv.conv.weight"] = weight
    return {k: v.contiguous() for k, v in found.items()}


def test_the_inverted_conversion_is_diffusers_own_inverse():
    """diffusers' own single-file conversion maps the test's original checkpoints back to the
    models' state dicts exactly (it handles one multi-scale kernel per level, as every
    release has)."""
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    for config in (SANA, IN_MIX):
        vae = make_dc(**config)
        converted = convert_autoencoder_dc_checkpoint_to_diffusers(original_checkpoint(vae))
        reference = vae.state_dict()
        assert set(converted) == set(reference)
        assert all(
            torch.equal(converted[k].reshape(reference[k].shape), reference[k]) for k in reference
        )


# SANA 1.0's f32c32 layout at test widths: six levels, 32 latent channels
SANA_F32 = dict(
    SANA,
    latent_channels=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    encoder_layers_per_block=(1,) * 6,
    decoder_layers_per_block=(1,) * 6,
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
)


@pytest.mark.parametrize(
    ("config", "scale"),
    [
        (SANA_F32, 0.41407),
        # what no tensor shows is every release's: heads of 32 (without a multi-scale
        # projection), SiLU in residual blocks with RMS norms, ReLU before the last convolution
        (dict(IN_MIX, attention_head_dim=32), 1.0),
        (dict(OTHER, decoder_act_fns="silu", decoder_conv_act_fn="relu"), 1.0),
    ],
    ids=["sana-f32c32", "in-mix", "other"],
)
def test_an_original_checkpoint_is_recognised(tmp_path, cli, config, scale):
    """An original checkpoint's architecture from its names and shapes alone: encode and decode
    as diffusers' on the same weights; SANA 1.0's layout takes its scaling factor, another says
    in one line that the file does not carry one."""
    vae = make_dc(**config)
    save_file(original_checkpoint(vae), tmp_path / "model.safetensors")
    model, info = load_weights(tmp_path / "model.safetensors")
    assert info.preset.startswith("AutoencoderDC (original keys")
    assert info.config.model.latent.scaling_factor == scale
    if scale == 1.0:
        assert "does not carry its scaling factor: give --scaling-factor" in info.preset
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        reference = vae.encode(x).latent
        spread = (reference.max() - reference.min()).item()
        assert (model.encode(x).mode() - reference).abs().max().item() <= 1e-4 * spread
        assert (model.decode(reference) - vae.decode(reference).sample).abs().max() <= 2 / 255
    result = cli(
        "export",
        tmp_path / "model.safetensors",
        "-o",
        tmp_path / "again.safetensors",
        "--format",
        "single-file",
    )
    assert result.exit_code == 0, result.output
    written = load_file(tmp_path / "again.safetensors")
    original = load_file(tmp_path / "model.safetensors")
    assert set(written) == set(original)
    assert all(torch.equal(written[k], original[k]) for k in original)


def test_twin_releases_say_which_factor_and_how_to_choose(tmp_path, cli):
    """dc-ae-f32c32-in-1.0 and -mix-1.0 have the same shapes and different scaling factors:
    mix-1.0's is taken (as diffusers' single-file loader does) and `aecli info` says so in one
    line, with how to choose in-1.0's."""
    f32c32 = dict(
        IN_MIX,
        latent_channels=32,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 8, 8, 16, 16, 32),
        decoder_block_out_channels=(8, 8, 8, 16, 16, 32),
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((),) * 6,
        decoder_qkv_multiscales=((),) * 6,
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    )
    save_file(original_checkpoint(make_dc(**f32c32)), tmp_path / "dc.safetensors")
    result = cli("info", tmp_path / "dc.safetensors")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "dc-ae-f32c32-in-1.0" in line]
    assert len(lines) == 1
    assert "dc-ae-f32c32-mix-1.0's scaling factor 0.4552" in lines[0]
    assert "--scaling-factor 0.3189" in lines[0]
    assert "(z - 0) * 0.4552" in result.stdout


def test_a_misshapen_original_checkpoint_names_the_key(tmp_path, cli):
    tensors = original_checkpoint(make_dc())
    key = "decoder.stages.1.op_list.1.local_module.main.point_conv.conv.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, tmp_path / "dc.safetensors")
    result = cli("info", tmp_path / "dc.safetensors")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"tensor {key} has shape" in result.stderr and "AutoencoderDC" in result.stderr
    del tensors[key]
    save_file(tensors, tmp_path / "dc.safetensors")
    result = cli("info", tmp_path / "dc.safetensors")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"missing tensor {key} for its AutoencoderDC layout" in result.stderr


def test_the_releases_spelling_of_resampling_types_is_read_as_diffusers_builds_it(tmp_path):
    """The released config.json files write "Conv" and "InterpolateConv", which diffusers builds
    as a strided convolution and a pixel shuffle (any name but pixel_unshuffle / interpolate):
    aecli reads them and computes what diffusers computes."""
    dcae = make_dc(
        **{**SANA, "downsample_block_type": "Conv", "upsample_block_type": "InterpolateConv"}
    )
    dcae.save_pretrained(tmp_path / "vae")
    model, _ = load_weights(tmp_path / "vae")
    torch.manual_seed(2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = dcae.encode(x).latent
        assert (model.encode(x).mode() - expected).abs().max() <= 1e-4 * expected.abs().max()
        z = torch.randn(1, 8, 2, 2)
        assert (model.decode(z) - dcae.decode(z).sample).abs().max() <= 1e-4

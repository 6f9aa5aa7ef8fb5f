import pytest
import torch

from aecli.config import list_presets, load_config
from aecli.errors import ConfigError
from aecli.losses import compute_loss
from aecli.models import DiagonalGaussian, build_model, summarize


@pytest.mark.parametrize(
    ("preset", "encoder", "decoder"),
    [
        ("mnist-cae", 2_262, 2_461),
        ("cifar-cae", 891_480, 895_315),
        ("cifar-cae-1000", 4_169_080, 4_172_115),
        ("fashion-vae", 69_076, 65_089),  # the Keras VAE example's summary
        ("cat-kl-f8", 34_163_664, 49_490_199),  # Stable Diffusion's VAE, 83,653,863 in all
    ],
)
def test_reference_parameter_counts(preset, encoder, decoder, cli):
    result = cli("info", preset, "--json")
    assert result.exit_code == 0
    import json

    facts = json.loads(result.stdout)
    assert (facts["encoder_parameters"], facts["decoder_parameters"]) == (encoder, decoder)
    assert facts["parameters"] == encoder + decoder
    for key in ("latent_shape", "compression_ratio"):
        assert key in facts
    # how `auto` runs it on CUDA (the policy itself: tests/test_devices.py)
    big = preset == "cat-kl-f8"
    expected = "bf16 autocast, contiguous" if big else "fp32 (TF32), channels-last"
    assert facts["cuda_execution"] == expected
    assert f"on CUDA      {expected}" in cli("info", preset).output


# Full architectures; only the image size is reduced where the full one is slow on a CPU.
SIZES = {"dog-vae": [], "cat-kl-f8": ["data.image_size=32"]}


@pytest.mark.parametrize(
    "preset",
    [p.name for p in list_presets()],
)
def test_each_preset_runs_forward_and_backward(preset):
    config = load_config(preset, SIZES.get(preset, [])).config
    torch.manual_seed(0)
    model = build_model(config)
    x = torch.rand(2, config.data.channels, *config.data.size)
    if config.data.range == "symmetric":
        x = x * 2 - 1
    out = model(x)
    assert out.image.shape == x.shape
    assert out.z.shape[1:] == model.latent_shape
    terms = compute_loss(out, x, config.loss, model.variational)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ("kl" in terms) == config.model.latent.variational


def test_kl_f8_is_fully_convolutional():
    model = build_model(load_config("cat-kl-f8", ["data.image_size=16"]).config).eval()
    with torch.no_grad():
        posterior = model.encode(torch.zeros(1, 3, 24, 40))
    assert posterior.mode().shape == (1, 4, 3, 5)  # 8x downsampling, 4 channels


def test_cifar_init_is_xavier_with_bias_001():
    model = build_model(load_config("cifar-cae").config)
    conv = model.encoder[0].conv
    assert torch.all(conv.bias == 0.01)
    bound = (6 / (3 * 9 + 16 * 9)) ** 0.5  # xavier-uniform bound for 3->16, 3x3
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > bound * 0.8


def test_keras_same_padding_shapes():
    model = build_model(load_config("mnist-cae").config, meta=True)
    assert summarize(load_config("mnist-cae").config, model).latent_shape == (10,)
    x = torch.empty(1, 1, 28, 28, device="meta")
    shapes = []
    for block in model.encoder:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(16, 14, 14), (8, 7, 7), (4, 4, 4)]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_transposed_same_crop_slices_and_returns_the_gradient_in_its_layout(layout):
    """Keras 'same' crops a transposed convolution's output with its own autograd function (a
    cheaper backward than slicing's): the values and gradients of slicing, in the input's
    memory format."""
    from aecli.models.blocks import Crop

    x = torch.randn(2, 3, 9, 9, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_(True)
    y = Crop.apply(x, 0, 1)  # the 3x3, stride-2 case: one pixel off the end
    assert torch.equal(y, x[..., :8, :8])
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    expected = torch.zeros_like(x)
    expected[..., :8, :8] = upstream
    assert torch.equal(grad, expected)
    assert grad.is_contiguous(memory_format=layout)
    assert torch.autograd.gradcheck(lambda t: Crop.apply(t, 1, 2), (x,))


def test_posterior_mode_sample_and_kl():
    mean, logvar = torch.zeros(4, 3), torch.zeros(4, 3)
    standard = DiagonalGaussian(mean, logvar)
    assert torch.allclose(standard.kl(), torch.zeros(4))
    shifted = DiagonalGaussian(torch.ones(4, 3), torch.zeros(4, 3))
    assert torch.allclose(shifted.kl(), torch.full((4,), 1.5))
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(shifted.sample(g), shifted.mode())
    assert torch.equal(shifted.mode(), torch.ones(4, 3))


def test_decoder_that_does_not_match_input_is_a_config_error(tiny_preset):
    with pytest.raises(ConfigError, match="model.decoder: produces 3x8x8"):
        build_model(load_config(str(tiny_preset), ["model.decoder.3.stride=1"]).config)


def test_impossible_block_names_its_place(tiny_preset):
    with pytest.raises(ConfigError, match=r"model.encoder.1 \(conv\)"):
        build_model(
            load_config(
                str(tiny_preset), ["model.encoder.1.kernel=40", "model.encoder.1.padding=valid"]
            ).config
        )


@pytest.mark.parametrize("preset", [p.name for p in list_presets()])
def test_shape_arithmetic_matches_running_each_block(preset):
    """The registry's output shape of every block of every preset is what the block gives."""
    from aecli.models.registry import BLOCKS

    config = load_config(preset).config
    model = build_model(config, meta=True)
    for specs, stack, shape in (
        (config.model.encoder, model.encoder, model.input_shape),
        (config.model.decoder, model.decoder, model.latent_shape),
    ):
        expanded = [spec for spec in specs for _ in range(getattr(spec, "repeat", 1))]
        with torch.device("meta"):
            for spec, layer in zip(expanded, stack, strict=True):
                expected = tuple(layer(torch.empty(2, *shape)).shape[1:])
                assert BLOCKS[spec.type].out_shape(spec, shape) == expected, spec
                shape = expected
    assert shape == model.input_shape


# the presets (cat-kl-f8 at a size whose attention is cheap on the meta device), and a FLUX-style
# VAE whose encoder output is the latent (no head)
FLOP_CASES = [(p.name, []) for p in list_presets() if p.name != "cat-kl-f8"] + [
    ("cat-kl-f8", ["data.image_size=64"]),
    ("cat-kl-f8", ["data.image_size=[48, 80]", "model.latent.head=false"]),
]


@pytest.mark.parametrize(("preset", "overrides"), FLOP_CASES)
def test_flop_arithmetic_is_what_torch_s_flop_counter_counts(preset, overrides):
    """`aecli info`, the CUDA precision policy and MFU take FLOPs from the registry's
    arithmetic; torch's FlopCounterMode, running the model on the meta device, is the
    reference for every block, the latent head and the whole forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from aecli.models import forward_flops
    from aecli.models.builder import layers

    config = load_config(preset, overrides).config
    model = build_model(config, meta=True)
    x = torch.empty(1, *model.input_shape, device="meta")
    found = layers(config)
    modules = [*model.encoder, model.latent_head, *model.decoder]
    for layer, module in zip(found, modules, strict=True):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = module(x)
        assert counter.get_total_flops() == layer.flops, (layer.part, layer.spec)
        # the head gives mean and log-variance for a VAE: the layer's output is the latent
        x = x.new_empty(1, *layer.output) if layer.part == "latent" else y
        assert tuple(x.shape[1:]) == layer.output, (layer.part, layer.spec)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, *model.input_shape, device="meta"), sample=False)
    assert forward_flops(config) == counter.get_total_flops() > 0


def test_every_block_type_of_the_schema_is_registered():
    """The registry is closed and complete: each `type` a preset may name has one entry, with
    that type's schema."""
    import typing

    from aecli.config import BlockSpec
    from aecli.models.registry import BLOCKS

    union = typing.get_args(typing.get_args(BlockSpec)[0])
    names = {typing.get_args(spec.model_fields["type"].annotation)[0]: spec for spec in union}
    assert names.keys() == BLOCKS.keys()
    assert all(BLOCKS[name].spec is spec for name, spec in names.items())


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 28, 28), (2, 3, 40, 24), (2, 3, 8, 8)])
def test_ssim_equals_torchmetrics(shape):
    from torchmetrics.functional.image import structural_similarity_index_measure

    from aecli.losses import ssim

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=generator)
    b = (a + 0.1 * torch.randn(shape, generator=generator)).clamp(0, 1)
    reference = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
    assert torch.allclose(ssim(b, a, reduction="none"), reference, atol=1e-6)
    assert ssim(a, a).item() == pytest.approx(1.0)
    assert ssim(a[..., :4, :4], a[..., :4, :4]).item() == pytest.approx(1.0)  # tiny images too


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["mse", "l1", "bce"])
def test_reconstruction_losses_are_their_definitions(kind, reduction):
    """Each loss, fused for speed, equals its written-out definition in value and gradient: the
    mean over every value, or (`reduction: sum`) each image's sum averaged over the batch."""
    from aecli.losses import reconstruction_loss
    from aecli.models.autoencoder import AutoencoderOutput

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 2, 5, 7, generator=generator)
    prediction = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64)
    prediction = prediction.to(torch.bfloat16).requires_grad_()  # as autocast leaves it
    p = prediction.double()
    y = target.double()
    per_element = {
        "mse": (p - y) ** 2,
        "l1": (p - y).abs(),
        "bce": -(y * torch.sigmoid(p).log() + (1 - y) * (1 - torch.sigmoid(p)).log()),
    }[kind]
    expected = per_element.sum((1, 2, 3)).mean() if reduction == "sum" else per_element.mean()
    (expected_grad,) = torch.autograd.grad(expected, prediction)
    # bce reads the logits (raw), the others the image; the field not read is None
    logits = kind == "bce"
    out = AutoencoderOutput(
        None, None, raw=prediction if logits else None, image=None if logits else prediction
    )
    loss = reconstruction_loss(out, target, kind, reduction)
    (grad,) = torch.autograd.grad(loss, prediction)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad.double(), expected_grad.double(), rtol=1e-2, atol=1e-6)


def test_forward_flops_count_every_layer_and_scale_with_pixels():
    from aecli.models import forward_flops

    # one 3x3 convolution, 3 -> 8 channels, at 16x16: 2 * 8 * 3 * 9 multiply-adds per pixel
    def conv_only(size: int) -> int:
        config = load_config(
            "default",
            [
                f"data.image_size={size}",
                "model.encoder=[{type: conv, out: 8}]",
                "model.latent={channels: 3}",
                "model.decoder=[{type: conv, out: 3, kernel: 1}]",
            ],
        ).config
        return forward_flops(config)

    latent_head = 2 * 3 * 8 * 16 * 16  # the 1x1 convolution to the latent (8 -> 3 channels)
    assert conv_only(16) == 2 * 8 * 27 * 16 * 16 + latent_head + 2 * 3 * 3 * 16 * 16
    assert conv_only(32) == 4 * conv_only(16)  # fully convolutional: proportional to pixels


def test_mfu_peaks_are_looked_up_by_gpu_name_and_never_guessed(monkeypatch):
    from aecli.devices import peak_flops, peak_for_name

    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_for_name("Tesla T4") is None
    assert peak_flops(torch.device("cpu", 0), torch.bfloat16) is None
    # without bf16 autocast the denominator is the TF32 peak, half the bf16 one
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    assert peak_flops(gpu, torch.bfloat16) == 989e12 and peak_flops(gpu, None) == 494.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(gpu, None) is None


def test_mfu_is_images_per_second_times_training_flops_over_the_peak(
    tiny_preset, tmp_path, monkeypatch
):
    """Where the device's peak is known (here a stand-in for the CPU, which has none), each
    epoch record's mfu is images/s x 3 x the forward FLOPs of one image over the peak."""
    import json

    import aecli.engine.trainer as trainer_module
    from aecli.data import load_data
    from aecli.models import forward_flops
    from aecli.run.training import train

    peak = 1e9
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device, dtype: peak)
    config = load_config(str(tiny_preset), ["train.epochs=2"]).config
    data = load_data(None, config.data, config.train.seed)
    train(config, data, tmp_path / "run", preset="tiny", device="cpu")
    flops = forward_flops(config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]
    assert len(epochs) == 2
    for record in epochs:
        assert record["mfu"] == pytest.approx(record["images_per_s"] * 3 * flops / peak, abs=1e-4)

"""One builder from a config to an Autoencoder, for every preset."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from aecli.config import Config, InitConfig
from aecli.errors import ConfigError
from aecli.models import blocks
from aecli.models.autoencoder import Autoencoder
from aecli.models.registry import Shape, block_flops, block_shape, build_block
from aecli.models.registry import fmt as _fmt


def expanded(specs: list) -> Iterator[tuple[int, object]]:
    """(index in the list, spec) for every block a stack runs: `repeat: n` gives n."""
    for index, spec in enumerate(specs):
        for _ in range(getattr(spec, "repeat", 1)):
            yield index, spec


def _build_stack(stack: list[Layer]) -> nn.Sequential:
    """The modules of a stack's layers (their shapes already checked by `layers`)."""
    modules = []
    for layer in stack:
        try:
            modules.append(build_block(layer.spec, layer.input))
        except (ValueError, RuntimeError) as exc:
            message = str(exc).splitlines()[0]
            raise ConfigError([f"{layer.where} ({layer.spec.type}): {message}"]) from None
    return nn.Sequential(*modules)


def _latent_shape(config: Config, shape: Shape) -> Shape:
    """The latent's shape after an encoder output of `shape` (checked against the config)."""
    latent = config.model.latent
    if not latent.head:
        # the encoder ends in the latent itself (mean and log-variance for a VAE)
        wanted = (_head_outputs(latent),)
        if shape[:1] != wanted or len(shape) != (3 if latent.spatial else 1):
            kind = "channels" if latent.spatial else "features"
            raise ConfigError(
                [
                    f"model.latent.head: false needs the encoder to end in {wanted[0]} {kind}"
                    f"{' (mean and log-variance)' if latent.variational else ''}, "
                    f"it ends in shape {_fmt(shape)}"
                ]
            )
        return (latent.channels, *shape[1:]) if latent.spatial else (latent.dim,)
    if latent.spatial:
        if len(shape) != 3:
            raise ConfigError(
                [
                    f"model.latent.channels: the encoder ends in shape {_fmt(shape)}, "
                    "a spatial latent needs an image (C, H, W)"
                ]
            )
        return (latent.channels, *shape[1:])
    return (latent.dim,)


def _head_outputs(latent) -> int:
    """The latent head's outputs per position: the code, or its mean and log-variance (VAE)."""
    return (latent.channels if latent.spatial else latent.dim) * (2 if latent.variational else 1)


def _latent_head(config: Config, shape: Shape) -> nn.Module:
    """The module from the encoder's output of `shape` to the latent (empty without a head)."""
    latent = config.model.latent
    if not latent.head:
        return nn.Sequential()
    outputs = _head_outputs(latent)
    if latent.spatial:
        return nn.Sequential(nn.Conv2d(shape[0], outputs, 1))
    parts = [nn.Flatten(1)] if len(shape) > 1 else []
    parts += [nn.Linear(math.prod(shape), outputs), blocks.activation(latent.act)]
    return nn.Sequential(*parts)


def _latent_head_flops(config: Config, shape: Shape) -> int:
    """The latent head's FLOPs (a 1x1 convolution or a linear layer) from `shape`."""
    latent = config.model.latent
    if not latent.head:
        return 0
    outputs = _head_outputs(latent)
    inputs, positions = (
        (shape[0], math.prod(shape[1:])) if latent.spatial else (math.prod(shape), 1)
    )
    return 2 * inputs * outputs * positions


def _latent_norm(config: Config) -> nn.Module | None:
    """The BatchNorm whose running statistics latent.statistics keeps (none without them)."""
    latent = config.model.latent
    stats = latent.statistics
    if stats is None:
        return None
    channels = latent.channels * stats.patch**2
    return nn.BatchNorm2d(channels, stats.eps, stats.momentum, affine=False)


@dataclass(frozen=True)
class Layer:
    """One block of a model as shapes and cost, for one item (no batch dimension)."""

    part: str  # encoder, latent (the head), decoder
    where: str  # the config key, for messages: model.encoder.3 (a repeated block's entry)
    spec: object | None  # the block's spec; None for the latent head
    input: Shape
    output: Shape
    flops: int  # forward FLOPs, as torch.utils.flop_counter counts them


def layers(config: Config, size: tuple[int, int] | None = None) -> list[Layer]:
    """Every block of the model a config describes, at an input of `size` (H, W; default the
    config's), with its shapes and forward FLOPs: arithmetic from the block registry, nothing
    built and nothing run (a meta-device forward pass would cost a second the first time in a
    process: torch imports its compiler for it)."""
    shape: Shape = (config.data.channels, *(size or config.data.size))
    found = []
    for part, specs in (("encoder", config.model.encoder), ("decoder", config.model.decoder)):
        if part == "decoder":
            latent = _latent_shape(config, shape)
            flops = _latent_head_flops(config, shape)
            found.append(Layer("latent", "model.latent", None, shape, latent, flops))
            shape = latent
        for index, spec in expanded(specs):
            where = f"model.{part}.{index}"
            try:
                out = block_shape(spec, shape)
            except ValueError as exc:
                raise ConfigError([f"{where} ({spec.type}): {exc}"]) from None
            found.append(Layer(part, where, spec, shape, out, block_flops(spec, shape, out)))
            shape = out
    return found


def _initialise(model: nn.Module, init: InitConfig) -> None:
    weight_init = {
        "xavier_uniform": nn.init.xavier_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
        "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    }.get(init.weight)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            if weight_init is not None:
                weight_init(module.weight)
            if init.bias is not None and module.bias is not None:
                nn.init.constant_(module.bias, init.bias)


def build_model(config: Config, *, meta: bool = False) -> Autoencoder:
    """Build the autoencoder a config describes (on the meta device for counting only)."""
    if meta:
        with torch.device("meta"):
            return _build(config)
    return _build(config)


def _build(config: Config) -> Autoencoder:
    input_shape = (config.data.channels, *config.data.size)
    found = layers(config)
    latent = next(layer for layer in found if layer.part == "latent")
    encoder = _build_stack([layer for layer in found if layer.part == "encoder"])
    head = _latent_head(config, latent.input)
    decoder = _build_stack([layer for layer in found if layer.part == "decoder"])
    latent_shape, out_shape = latent.output, found[-1].output
    if out_shape != input_shape:
        raise ConfigError(
            [
                f"model.decoder: produces {_fmt(out_shape)} but the input is "
                f"{_fmt(input_shape)} (data.channels x data.image_size)"
            ]
        )
    model = Autoencoder(
        encoder,
        head,
        decoder,
        variational=config.model.latent.variational,
        output=config.model.output,
        input_shape=input_shape,
        latent_shape=latent_shape,
        latent_norm=_latent_norm(config),
    )
    _initialise(model, config.model.init)
    return model


@dataclass(frozen=True)
class ModelSummary:
    parameters: int
    encoder_parameters: int
    decoder_parameters: int
    input_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    compression_ratio: float
    variational: bool
    latent_kind: str
    forward_gflops: float  # per image at the input size; a training step takes about 3x


def forward_flops(config: Config, size: tuple[int, int] | None = None) -> int:
    """Floating-point operations of one image's forward pass (encode, decode) at `size` (H, W;
    default the config's), as torch.utils.flop_counter counts them; arithmetic (`layers`)."""
    return sum(layer.flops for layer in layers(config, size))


def activation_bytes(found: list[Layer]) -> int:
    """About the memory one item needs in activations under inference through these layers:
    three times the largest tensor between them (a residual block holds its input, a hidden
    state and its output at once), in float32."""
    largest = max(math.prod(shape) for layer in found for shape in (layer.input, layer.output))
    return 3 * largest * 4


def summarize(config: Config, model: Autoencoder | None = None) -> ModelSummary:
    """The facts `aecli info` prints about the model of `config` (`model`: that model, already
    built, for example on the meta device)."""
    model = model if model is not None else build_model(config, meta=True)
    enc = sum(p.numel() for p in model.encoder.parameters())
    enc += sum(p.numel() for p in model.latent_head.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    return ModelSummary(
        parameters=enc + dec,
        encoder_parameters=enc,
        decoder_parameters=dec,
        input_shape=tuple(model.input_shape),
        latent_shape=tuple(model.latent_shape),
        compression_ratio=round(math.prod(model.input_shape) / math.prod(model.latent_shape), 3),
        variational=model.variational,
        latent_kind="spatial" if len(model.latent_shape) == 3 else "vector",
        forward_gflops=round(forward_flops(config) / 1e9, 6),
    )

"""One builder from a config to an Autoencoder, for every preset."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from aecli.config import Config, InitConfig
from aecli.errors import ConfigError
from aecli.models import blocks
from aecli.models.autoencoder import Autoencoder
from aecli.models.registry import Shape, build_block
from aecli.models.registry import fmt as _fmt


def _build_stack(specs: list, shape: Shape, where: str) -> tuple[nn.Sequential, Shape]:
    layers = []
    for index, spec in enumerate(specs):
        for _ in range(getattr(spec, "repeat", 1)):
            try:
                layer, shape = build_block(spec, shape)
            except (ValueError, RuntimeError) as exc:
                message = str(exc).splitlines()[0]
                raise ConfigError([f"{where}.{index} ({spec.type}): {message}"]) from None
            layers.append(layer)
    return nn.Sequential(*layers), shape


def _latent_head(config: Config, shape: Shape) -> tuple[nn.Module, Shape]:
    latent = config.model.latent
    factor = 2 if latent.variational else 1
    if not latent.head:
        # the encoder ends in the latent itself (mean and log-variance for a VAE)
        wanted = (latent.channels * factor,) if latent.spatial else (latent.dim * factor,)
        if shape[:1] != wanted or len(shape) != (3 if latent.spatial else 1):
            kind = "channels" if latent.spatial else "features"
            raise ConfigError(
                [
                    f"model.latent.head: false needs the encoder to end in {wanted[0]} {kind}"
                    f"{' (mean and log-variance)' if latent.variational else ''}, "
                    f"it ends in shape {_fmt(shape)}"
                ]
            )
        latent_shape = (latent.channels, *shape[1:]) if latent.spatial else (latent.dim,)
        return nn.Sequential(), latent_shape
    if latent.spatial:
        if len(shape) != 3:
            raise ConfigError(
                [
                    f"model.latent.channels: the encoder ends in shape {_fmt(shape)}, "
                    "a spatial latent needs an image (C, H, W)"
                ]
            )
        head = nn.Sequential(nn.Conv2d(shape[0], latent.channels * factor, 1))
        latent_shape = (latent.channels, *shape[1:])
    else:
        parts = [nn.Flatten(1)] if len(shape) > 1 else []
        parts += [nn.Linear(math.prod(shape), latent.dim * factor), blocks.activation(latent.act)]
        head = nn.Sequential(*parts)
        latent_shape = (latent.dim,)
    return head, latent_shape


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
    encoder, features = _build_stack(config.model.encoder, input_shape, "model.encoder")
    head, latent_shape = _latent_head(config, features)
    decoder, out_shape = _build_stack(config.model.decoder, latent_shape, "model.decoder")
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


def forward_flops(model: Autoencoder) -> int:
    """Floating-point operations of one image's forward pass (encode, decode), counted by
    torch.utils.flop_counter on the meta device: no memory, no compute. Call it with a model
    built with `meta=True`."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty(1, *model.input_shape, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x, sample=False)
    return counter.get_total_flops()


def activation_bytes(module: nn.Module, shape: tuple[int, ...]) -> int:
    """About the memory one input of `shape` (with its batch dimension of 1) needs in
    activations under inference: three times the largest output of any layer (a residual
    block holds its input, a hidden state and its output at once), in float32. Counted on the
    meta device; `module` must be built with `meta=True`."""
    largest = math.prod(shape)

    def hook(_module, _inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            module(torch.empty(shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return 3 * largest * 4


def summarize(model: Autoencoder) -> ModelSummary:
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
        forward_gflops=round(forward_flops(model) / 1e9, 6),
    )

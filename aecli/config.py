"""The typed preset schema, loading presets by name or path, and `--set key=value` overrides.

A preset is YAML with the sections `data`, `model`, `loss`, `optim` and `train`. Every section is
a strict pydantic model: unknown keys and wrong types are errors that name the key and the file,
and all problems are reported at once.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aecli.errors import ConfigError, UsageError, os_reason

Activation = Literal["none", "relu", "silu", "leaky_relu", "gelu", "tanh", "sigmoid", "elu"]
NormKind = Literal["none", "batch", "group", "instance"]
Size2 = Union[int, tuple[int, int]]  # noqa: UP007  (pydantic needs the runtime union)


def to_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Architecture blocks: each list entry of model.encoder / model.decoder is one of these.


class ConvSpec(Strict):
    """Conv2d, then optional norm and activation. `padding: same` follows TensorFlow (Keras)."""

    type: Literal["conv"]
    out: int = Field(gt=0, description="output channels")
    kernel: int = Field(3, gt=0, description="kernel size")
    stride: int = Field(1, gt=0, description="stride")
    padding: int | Literal["same", "valid"] = Field(
        "same", description="pixels on each side, or same (TensorFlow's) or valid (none)"
    )
    bias: bool = Field(True, description="learn a bias")
    norm: NormKind = Field("none", description="normalisation after the convolution")
    groups: int = Field(32, gt=0, description="GroupNorm groups when norm is group")
    act: Activation = Field("none", description="activation after the norm")
    repeat: int = Field(1, gt=0, le=256, description="the block this many times in a row")


class ConvTransposeSpec(Strict):
    """ConvTranspose2d, then optional norm and activation. `padding: same` gives in*stride."""

    type: Literal["conv_transpose"]
    out: int = Field(gt=0, description="output channels")
    kernel: int = Field(3, gt=0, description="kernel size")
    stride: int = Field(1, gt=0, description="stride")
    padding: int | Literal["same"] = Field(
        "same", description="pixels on each side, or same (output = input x stride)"
    )
    output_padding: int = Field(0, ge=0, description="extra rows and columns on one side")
    bias: bool = Field(True, description="learn a bias")
    norm: NormKind = Field("none", description="normalisation after the convolution")
    groups: int = Field(32, gt=0, description="GroupNorm groups when norm is group")
    act: Activation = Field("none", description="activation after the norm")
    repeat: int = Field(1, gt=0, le=256, description="the block this many times in a row")


class ResBlockSpec(Strict):
    """Pre-activation residual block of latent diffusion: (norm, act, conv3x3) x 2 + shortcut."""

    type: Literal["resblock"]
    out: int | None = Field(
        None,
        gt=0,
        description="output channels (default: the input's); a 1x1 shortcut when they differ",
    )
    groups: int = Field(32, gt=0, description="GroupNorm groups")
    act: Activation = Field("silu", description="activation after each norm")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the second convolution")
    repeat: int = Field(1, gt=0, le=256, description="the block this many times in a row")


class TinyBlockSpec(Strict):
    """TAESD's residual block: conv3x3, act, conv3x3, act, conv3x3, plus the input (a 1x1
    convolution without bias where the widths differ), then ReLU; no normalisation."""

    type: Literal["tinyblock"]
    out: int | None = Field(None, gt=0, description="output channels (default: the input's)")
    act: Activation = Field("relu", description="activation between the convolutions")
    repeat: int = Field(1, gt=0, le=256, description="the block this many times in a row")


class SoftClampSpec(Strict):
    """tanh(x / magnitude) * magnitude: TAESD's decoder bounds its latent input with it."""

    type: Literal["soft_clamp"]
    magnitude: float = Field(3.0, gt=0.0, allow_inf_nan=False, description="the bound")


class AttentionSpec(Strict):
    """Single-head spatial self-attention with GroupNorm and a residual connection."""

    type: Literal["attention"]
    groups: int = Field(32, gt=0, description="GroupNorm groups")
    repeat: int = Field(1, gt=0, le=256, description="the block this many times in a row")


class NormSpec(Strict):
    """A normalisation layer on its own."""

    type: Literal["norm"]
    kind: NormKind = Field("group", description="the normalisation")
    groups: int = Field(32, gt=0, description="GroupNorm groups when kind is group")


class ActSpec(Strict):
    """An activation on its own."""

    type: Literal["act"]
    fn: Activation = Field(description="the activation")


class UpsampleSpec(Strict):
    """Upsample by a whole factor."""

    type: Literal["upsample"]
    factor: int = Field(2, gt=0, description="scale factor of both sides")
    mode: Literal["nearest", "bilinear"] = Field("nearest", description="interpolation")


class ResizeSpec(Strict):
    """Resize to a fixed size (the Keras reference's bilinear 30x30 -> 28x28 output resize)."""

    type: Literal["resize"]
    size: Size2 = Field(description="output size: N or [H, W]")
    mode: Literal["bilinear", "nearest", "bicubic"] = Field("bilinear", description="interpolation")


class FlattenSpec(Strict):
    """Flatten (channels, height, width) to a vector."""

    type: Literal["flatten"]


class LinearSpec(Strict):
    """A fully connected layer, then an optional activation."""

    type: Literal["linear"]
    out: int = Field(gt=0, description="output features")
    bias: bool = Field(True, description="learn a bias")
    act: Activation = Field("none", description="activation after the layer")


class ReshapeSpec(Strict):
    """Reshape a vector to (channels, height, width)."""

    type: Literal["reshape"]
    shape: tuple[int, int, int] = Field(description="[channels, height, width]")


# -- DC-AE (AutoencoderDC) blocks: aecli.models.dc ------------------------------------------

DCNorm = Literal["rms", "batch"]


class DCResBlockSpec(Strict):
    """DC-AE's residual block: conv3x3, act, conv3x3 without bias, a norm (RMS over the
    channels of each pixel, or BatchNorm), plus the input."""

    type: Literal["dc_resblock"]
    norm: DCNorm = Field("rms", description="the norm after the second convolution")
    act: Activation = Field("silu", description="activation between the convolutions")
    repeat: int = Field(1, gt=0, le=256, description="the block this many times in a row")


class DCViTSpec(Strict):
    """DC-AE's EfficientViT block: multi-scale ReLU linear attention, then GLUMBConv (a gated
    depthwise feed-forward), each with a norm and a residual connection."""

    type: Literal["dc_vit"]
    head_dim: int = Field(32, gt=0, le=1024, description="channels per attention head")
    scales: tuple[Annotated[int, Field(gt=0, le=31)], ...] = Field(
        (), max_length=4, description="kernel sizes (odd) of the multi-scale q, k, v"
    )
    norm: DCNorm = Field("rms", description="the norm after the attention")
    repeat: int = Field(1, gt=0, le=256, description="the block this many times in a row")


class DCDownSpec(Strict):
    """DC-AE's downsampling: conv3x3 to out / 4 channels and a pixel unshuffle, or a strided
    conv3x3; plus (shortcut) the input pixel-unshuffled and averaged over groups of channels."""

    type: Literal["dc_down"]
    out: int = Field(gt=0, description="output channels")
    mode: Literal["pixel_unshuffle", "conv"] = Field(
        "pixel_unshuffle", description="pixel_unshuffle or a strided convolution (conv)"
    )
    shortcut: bool = Field(True, description="add the input, unshuffled and averaged")


class DCUpSpec(Strict):
    """DC-AE's upsampling: conv3x3 to 4 x out channels and a pixel shuffle, or nearest
    upsampling and conv3x3; plus (shortcut) the input's channels repeated and shuffled."""

    type: Literal["dc_up"]
    out: int = Field(gt=0, description="output channels")
    mode: Literal["pixel_shuffle", "interpolate"] = Field(
        "pixel_shuffle", description="pixel_shuffle or nearest upsampling (interpolate)"
    )
    shortcut: bool = Field(True, description="add the input, repeated and shuffled")


class DCEncoderOutSpec(Strict):
    """DC-AE's encoder output: conv3x3 to the latent plus (shortcut) the input averaged over
    groups of consecutive channels."""

    type: Literal["dc_encoder_out"]
    out: int = Field(gt=0, description="output channels: a divisor of the input's")
    shortcut: bool = Field(True, description="add the input, averaged over channel groups")


class DCDecoderInSpec(Strict):
    """DC-AE's decoder input: conv3x3 from the latent plus (shortcut) the latent's channels,
    each repeated out / latent channels times."""

    type: Literal["dc_decoder_in"]
    out: int = Field(gt=0, description="output channels: a multiple of the input's")
    shortcut: bool = Field(True, description="add the input's channels, repeated")


class DCRMSNormSpec(Strict):
    """An RMS norm over the channels of each pixel, with a weight and a bias (DC-AE's)."""

    type: Literal["dc_rms_norm"]


# (end of DC-AE blocks)

# -- Wan 2.1 / 2.2 and Qwen-Image (AutoencoderKLWan, AutoencoderKLQwenImage): aecli.models.wan -


class WanPatchSpec(Strict):
    """The image as the Wan / Qwen-Image VAE's encoder takes it: Wan 2.2's patch x patch
    squares of pixels as channels (patch 1: as it is); `release` names the diffusers class
    the model is read and written as."""

    type: Literal["wan_patch"]
    patch: int = Field(1, ge=1, le=8, description="side of the squares that become channels")
    release: Literal["wan", "qwen-image"] = Field(
        "wan", description="wan: AutoencoderKLWan; qwen-image: AutoencoderKLQwenImage"
    )


class WanUnpatchSpec(Strict):
    """Wan 2.2's channels back to patch x patch squares of pixels, after its decoder."""

    type: Literal["wan_unpatch"]
    patch: int = Field(1, ge=1, le=8, description="side of the squares the channels become")


class WanConvSpec(Strict):
    """Wan's causal 3-D convolution (cubic kernel) on a single frame: its last time slice."""

    type: Literal["wan_conv"]
    out: int = Field(gt=0, description="output channels")
    kernel: Literal[1, 3] = Field(3, description="kernel size (1 or 3) in time and space")


class WanResBlockSpec(Strict):
    """Wan's residual block: (RMS norm, SiLU, causal 3x3x3 convolution) x 2 + shortcut."""

    type: Literal["wan_resblock"]
    out: int | None = Field(
        None, gt=0, description="output channels (default: the input's); a 1x1x1 shortcut else"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the second conv")


class WanAttentionSpec(Strict):
    """Wan's single-head attention over a frame's pixels, with RMS norm and the input added."""

    type: Literal["wan_attention"]


class WanNormSpec(Strict):
    """Wan's RMS norm of each pixel's channels, with a learned scale per channel."""

    type: Literal["wan_norm"]


class WanResampleSpec(Strict):
    """Wan's 2x resampling: down (pad, stride-2 3x3 conv) or up (nearest, 3x3 conv)."""

    type: Literal["wan_resample"]
    mode: Literal["down", "up"] = Field(description="down- or upsampling")
    time: bool = Field(
        False,
        description="the video VAE halves or doubles time here: its time convolution's "
        "weights are kept (a single frame never runs it)",
    )
    out: int | None = Field(None, gt=0, description="up: output channels (default: the input's)")


class WanDownBlockSpec(Strict):
    """Wan 2.2's residual down block: residual blocks and a downsampling, plus the input's
    2x2 squares as channels averaged in groups."""

    type: Literal["wan_down_block"]
    out: int = Field(gt=0, description="output channels")
    blocks: int = Field(2, ge=1, le=16, description="residual blocks")
    down: bool = Field(True, description="downsample 2x (false at the last level)")
    time: bool = Field(False, description="the video VAE halves time here")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout of its residual blocks")


class WanUpBlockSpec(Strict):
    """Wan 2.2's residual up block: residual blocks and a 2x upsampling, plus the input's
    channels repeated and moved to 2x2 squares of pixels."""

    type: Literal["wan_up_block"]
    out: int = Field(gt=0, description="output channels")
    blocks: int = Field(3, ge=1, le=17, description="residual blocks")
    time: bool = Field(False, description="the video VAE doubles time here")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout of its residual blocks")


# (end of Wan blocks)

# -- HunyuanImage 2.1 (AutoencoderKLHunyuanImage): aecli.models.hunyuan ----------------------


class HunyuanDownSpec(Strict):
    """HunyuanImage 2.1's downsampling: a 3x3 convolution to out / 4 channels and 2x2
    space-to-channel, plus the input's 2x2 space-to-channel averaged over groups of channels."""

    type: Literal["hunyuan_down"]
    out: int = Field(
        gt=0, description="output channels: a multiple of 4 that divides 4x the input's"
    )


class HunyuanUpSpec(Strict):
    """HunyuanImage 2.1's upsampling: a 3x3 convolution to 4 x out channels and 2x2
    channel-to-space, plus the input's channels repeated and moved to space the same way."""

    type: Literal["hunyuan_up"]
    out: int = Field(gt=0, description="output channels: 4x them a multiple of the input's")


class HunyuanInSpec(Strict):
    """HunyuanImage 2.1's decoder input: a 3x3 convolution plus the latent's channels, each
    repeated out / latent channels times."""

    type: Literal["hunyuan_in"]
    out: int = Field(gt=0, description="output channels: a multiple of the input's")


class HunyuanOutSpec(Strict):
    """HunyuanImage 2.1's encoder output: GroupNorm, SiLU and a 3x3 convolution, plus the
    input averaged over groups of consecutive channels."""

    type: Literal["hunyuan_out"]
    out: int = Field(gt=0, description="output channels: a divisor of the input's")
    groups: int = Field(32, gt=0, description="GroupNorm groups")


# (end of HunyuanImage blocks)


BlockSpec = Annotated[
    Union[  # noqa: UP007
        # DC-AE specs
        DCResBlockSpec,
        DCViTSpec,
        DCDownSpec,
        DCUpSpec,
        DCEncoderOutSpec,
        DCDecoderInSpec,
        DCRMSNormSpec,
        # Wan specs
        WanPatchSpec,
        WanUnpatchSpec,
        WanConvSpec,
        WanResBlockSpec,
        WanAttentionSpec,
        WanNormSpec,
        WanResampleSpec,
        WanDownBlockSpec,
        WanUpBlockSpec,
        # HunyuanImage specs
        HunyuanDownSpec,
        HunyuanUpSpec,
        HunyuanInSpec,
        HunyuanOutSpec,
        ConvSpec,
        ConvTransposeSpec,
        ResBlockSpec,
        TinyBlockSpec,
        SoftClampSpec,
        AttentionSpec,
        NormSpec,
        ActSpec,
        UpsampleSpec,
        ResizeSpec,
        FlattenSpec,
        LinearSpec,
        ReshapeSpec,
    ],
    Field(discriminator="type"),
]


# ---------------------------------------------------------------------------------------------
# Sections


class AugmentConfig(Strict):
    """Augmentation applied to each training batch on the device."""

    hflip: bool = Field(False, description="flip half the training images left to right")
    crop_scale: tuple[float, float] | None = Field(
        None, description="random resized crop: area fraction range, e.g. [0.75, 1.0]"
    )


class DataConfig(Strict):
    """What the model sees, and how images are read."""

    image_size: Size2 = Field(32, description="the size the model sees: N or [H, W]")
    channels: Literal[1, 3] = Field(3, description="1 (grayscale) or 3 (RGB)")
    range: Literal["unit", "symmetric"] = Field(
        "unit", description="pixel range the model sees: unit [0, 1] or symmetric [-1, 1]"
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="share held out for validation (seeded split)"
    )
    fit: Literal["crop", "stretch"] = Field(
        "crop", description="how images of another size are fitted: centre crop or stretch"
    )
    builtin_count: int = Field(2048, gt=1, description="images in the built-in shapes data")
    augment: AugmentConfig = Field(AugmentConfig(), description="per-batch augmentation")
    stream: Literal["auto"] | bool = Field(
        "auto",
        description="read images from disk in worker processes every epoch instead of holding "
        "the decoded set in memory: auto streams where the decoded set would take more than a "
        "quarter of available memory, or data.resize / data.crop: random ask for full images; "
        "WebDataset shards always stream",
    )
    resize: int | tuple[int, int] | None = Field(
        None,
        description="streamed: resize each image's shorter side to N, or to a size drawn per "
        "sample from [lo, hi], before data.crop takes data.image_size from it",
    )
    crop: Literal["center", "random"] = Field(
        "center", description="streamed: where the image_size crop is taken from each image"
    )
    val_max: int = Field(
        1000, gt=0, description="streamed: at most this many validation images (in memory)"
    )
    workers: int | None = Field(
        None, ge=0, description="streamed: decoding processes (default: one per core but one)"
    )

    @property
    def size(self) -> tuple[int, int]:
        return to_hw(self.image_size)

    @property
    def resize_range(self) -> tuple[int, int] | None:
        """data.resize as (lo, hi) shorter sides, or None."""
        return None if self.resize is None else to_hw(self.resize)

    @model_validator(mode="after")
    def _resize_covers_the_crop(self) -> DataConfig:
        low, high = self.resize_range or (max(self.size), max(self.size))
        if low > high:
            raise ValueError(f"resize: [{low}, {high}] must run from low to high")
        if low < max(self.size):
            raise ValueError(
                f"resize: a shorter side of {low} is less than the crop ({max(self.size)}, "
                "data.image_size)"
            )
        if self.stream is False and (self.resize is not None or self.crop == "random"):
            raise ValueError("resize and crop: random need data.stream (auto or true)")
        return self


class LatentStatistics(Strict):
    """FLUX.2's BatchNorm statistics of the latent in patches, kept with the weights for --scaled.

    Its pipelines normalise the patchified latent with the running mean and variance; the model
    itself never runs the BatchNorm, and training leaves the statistics as they are.
    """

    patch: int = Field(2, ge=1, le=8, description="side of the squares that become channels")
    eps: float = Field(1.0e-4, gt=0.0, allow_inf_nan=False, description="added to the variance")
    momentum: float = Field(
        0.1, ge=0.0, le=1.0, description="BatchNorm's momentum (kept for export)"
    )


class LatentConfig(Strict):
    """The latent: a vector (dim) or a spatial map (channels), plain or variational."""

    dim: int | None = Field(None, gt=0, description="vector latent size")
    channels: int | None = Field(None, gt=0, description="spatial latent channels")
    variational: bool = Field(
        False, description="a VAE: the encoder gives a mean and a log-variance"
    )
    act: Activation = Field("none", description="activation on a plain latent")
    head: bool = Field(
        True,
        description="a 1x1 convolution (spatial) or linear layer (vector) from the encoder's "
        "output to the latent; false: the encoder's output is the latent (SD3 / FLUX VAEs)",
    )
    scaling_factor: (
        Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
        | list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]]
    ) = Field(
        1.0,
        description="encode --scaled writes (z - shift_factor) * scaling_factor: one number, "
        "or one per latent channel (Wan, Qwen-Image: 1 / latents_std)",
    )
    shift_factor: (
        Annotated[float, Field(allow_inf_nan=False)]
        | list[Annotated[float, Field(allow_inf_nan=False)]]
    ) = Field(
        0.0,
        description="subtracted before scaling_factor (FLUX, SD3): one number, or one per latent "
        "channel (Wan, Qwen-Image: latents_mean)",
    )
    statistics: LatentStatistics | None = Field(
        None,
        description="per-channel statistics of the patchified latent, with the weights, that "
        "encode --scaled normalises with instead of the factors (FLUX.2)",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> LatentConfig:
        if (self.dim is None) == (self.channels is None):
            raise ValueError("set exactly one of latent.dim (vector) or latent.channels (spatial)")
        if self.variational and self.act != "none":
            raise ValueError("latent.act must be none for a variational latent")
        if not self.head and self.act != "none":
            raise ValueError("latent.act needs latent.head (the activation follows it)")
        if self.statistics is not None and self.channels is None:
            raise ValueError("latent.statistics needs a spatial latent (latent.channels)")
        for key in ("scaling_factor", "shift_factor"):
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != self.channels:
                raise ValueError(
                    f"latent.{key}: {len(value)} numbers for {self.channels or 0} latent channels"
                )
        return self

    @property
    def spatial(self) -> bool:
        return self.channels is not None


class InitConfig(Strict):
    """Weight initialisation."""

    weight: Literal["default", "xavier_uniform", "xavier_normal", "kaiming_normal"] = Field(
        "default", description="initialisation of convolution and linear weights"
    )
    bias: float | None = Field(None, description="fill biases with this (default: PyTorch's)")


class ModelConfig(Strict):
    """The architecture: encoder blocks, the latent, decoder blocks."""

    encoder: list[BlockSpec] = Field(min_length=1, description="the encoder's blocks, in order")
    latent: LatentConfig = Field(description="the latent between encoder and decoder")
    decoder: list[BlockSpec] = Field(min_length=1, description="the decoder's blocks, in order")
    output: Literal["sigmoid", "tanh", "none"] = Field(
        "sigmoid", description="maps the decoder's raw output into the data range"
    )
    init: InitConfig = Field(InitConfig(), description="weight initialisation")


class LossConfig(Strict):
    """The objective: a reconstruction term plus optional KL, SSIM, LPIPS and GAN terms."""

    reconstruction: Literal["mse", "l1", "bce"] = Field(
        "mse", description="the reconstruction term"
    )
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="mean over all pixels, or sum over each image's pixels"
    )
    kl_weight: float = Field(1.0, ge=0.0, description="weight of a VAE's KL term")
    kl_warmup_steps: int = Field(0, ge=0, description="KL weight ramps linearly from 0")
    ssim_weight: float = Field(0.0, ge=0.0, description="weight of the 1 - SSIM term")
    ms_ssim_weight: float = Field(0.0, ge=0.0, description="weight of the 1 - MS-SSIM term")
    perceptual_weight: float = Field(
        0.0, ge=0.0, description="weight of the LPIPS (VGG) term; needs the lpips extra"
    )
    disc_weight: float = Field(
        0.0,
        ge=0.0,
        description="PatchGAN discriminator: the generator term's weight times the adaptive "
        "weight (0: no discriminator)",
    )
    disc_start: int = Field(
        0, ge=0, description="the step from which the discriminator trains and weighs in"
    )
    disc_layers: int = Field(3, ge=1, le=6, description="the discriminator's strided layers")
    disc_channels: int = Field(64, gt=0, description="the discriminator's first width")


class ScheduleConfig(Strict):
    """Learning-rate schedule, a pure function of the step (nothing to restore on resume)."""

    kind: Literal["constant", "cosine", "step"] = Field(
        "constant", description="the schedule after the warm-up"
    )
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: the final learning rate")
    step_epochs: int = Field(30, gt=0, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0.0, description="step: factor at each decay")


class OptimConfig(Strict):
    """The optimiser and its learning-rate schedule."""

    name: Literal["adam", "adamw"] = Field("adam", description="the optimiser")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's betas")
    eps: float = Field(1e-8, gt=0.0, description="Adam's epsilon")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay (decoupled with adamw)")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="learning-rate schedule")


class EarlyStoppingConfig(Strict):
    """Keras-style early stopping on a validation metric."""

    monitor: Literal["val_loss", "val_psnr"] = Field(
        "val_loss", description="the validation metric watched"
    )
    patience: int = Field(10, gt=0, description="epochs without improvement before the stop")
    min_delta: float = Field(0.0, ge=0.0, description="the least change that counts as improvement")
    start_epoch: int = Field(1, gt=0, description="epochs before this one never stop the run")
    restore_best: bool = Field(True, description="end with the best epoch's weights")


class EmaConfig(Strict):
    """An exponential moving average of the weights."""

    decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per step")


# Seeds are unsigned 64-bit numbers, what torch's generators take.
MAX_SEED = 2**64 - 1


class TrainConfig(Strict):
    """The training loop."""

    epochs: int = Field(10, gt=0, description="passes over the training data")
    batch_size: int = Field(64, gt=0, description="images per step (over all processes)")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of the split, order, augmentation and noise"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: on CUDA bf16 autocast for models of at least 0.25 GFLOPs per image, "
        "else fp32 on TF32 tensor cores; fp32 on the CPU",
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="auto: channels-last (on CUDA contiguous for models with GroupNorm)",
    )
    compile: bool = Field(False, description="torch.compile the model")
    cuda_graph: bool = Field(
        False,
        description="replay the training step as one CUDA graph (CUDA, one process; not with "
        "train.compile or the discriminator)",
    )
    freeze: Literal["none", "encoder", "decoder"] = Field(
        "none",
        description="keep this part's weights as they start (e.g. fine-tune a VAE's decoder "
        "from --init weights)",
    )
    deterministic: bool = Field(
        False,
        description="deterministic algorithms (bit-exact resume on CUDA), at some cost in speed",
    )
    grid_images: int = Field(8, ge=0, description="validation images in each epoch's grid")
    log_every: int = Field(
        10, gt=0, description="steps between progress refreshes and metrics.jsonl window records"
    )
    log_to: list[Literal["tensorboard"]] = Field(
        [], description="also log to these (tensorboard: event files under RUN/tensorboard)"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="steps between checkpoints (0: at the end of each epoch only)"
    )
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="stop when validation stops improving"
    )
    ema: EmaConfig | None = Field(None, description="validate and export an EMA of the weights")


class Config(Strict):
    data: DataConfig = Field(DataConfig(), description="what the model sees")
    model: ModelConfig = Field(description="the architecture")
    loss: LossConfig = Field(LossConfig(), description="the training objective")
    optim: OptimConfig = Field(OptimConfig(), description="the optimiser")
    train: TrainConfig = Field(TrainConfig(), description="the training loop")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.loss.reconstruction == "bce" and self.data.range != "unit":
            raise ValueError("loss.reconstruction bce needs data.range unit (targets in [0, 1])")
        return self


# ---------------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"malformed YAML: {where}{problem}"], path=source) from exc


def read_yaml_text(path: Path) -> str:
    """A YAML file's text; a file that is not UTF-8 text or cannot be read is one line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"not UTF-8 text (byte {exc.start}); a preset is a YAML text file"], path=path
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read: {os_reason(exc)}", path=path) from None


def presets_dir() -> Path:
    """The bundled presets: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "presets"
    return packaged if packaged.is_dir() else here.parent / "presets"


@dataclass(frozen=True)
class PresetInfo:
    name: str
    path: Path
    description: str
    quality: str = ""  # the header's `# quality:` line: measured held-out figures


QUALITY_PREFIX = "# quality:"


def list_presets() -> list[PresetInfo]:
    """Every bundled preset with the one-line description from its header comment and, where
    benchmarks/quality.py measured it, its held-out figures."""
    found = []
    for path in sorted(presets_dir().glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        first = lines[:1]
        description = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
        quality = next(
            (
                line[len(QUALITY_PREFIX) :].strip()
                for line in lines
                if line.startswith(QUALITY_PREFIX)
            ),
            "",
        )
        found.append(PresetInfo(path.stem, path, description, quality))
    return found


# What `aecli train` trains without a PRESET: aecli's own residual 32x32 colour autoencoder,
# the one that beats cifar-cae by the held-out figures. `default` names it too.
DEFAULT_PRESET = "cifar-res"
DEFAULT_ALIAS = "default"


def resolve_preset(preset: str | None) -> tuple[str, Path]:
    """Map a bundled name or a YAML path to (name, path)."""
    if preset in (None, "", DEFAULT_ALIAS):
        preset = DEFAULT_PRESET
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise UsageError("preset file not found", path=preset)
        return candidate.stem, candidate
    names = [p.name for p in list_presets()]
    bundled = presets_dir() / f"{preset}.yaml"
    if preset in names:
        return preset, bundled
    if "/" in preset or os.sep in preset or candidate.suffix:  # meant as a path
        what = "folder" if preset.endswith(("/", os.sep)) else "file"
        raise UsageError(f"{what} not found", path=preset)
    hint = difflib.get_close_matches(preset, names, n=1)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
    raise UsageError(
        f"unknown preset '{preset}', and no file or folder of that name here{suggestion} "
        f"(bundled: {', '.join(names)}; or give a path to a .yaml file)"
    )


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    name: str
    source: str


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> LoadedConfig:
    """Load a preset (bundled name or YAML path), apply `key=value` overrides and validate."""
    name, path = resolve_preset(preset)
    source = str(path)
    raw = parse_yaml(read_yaml_text(path), source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections"], path=source)
    return override_config(raw, name, source, overrides)


def override_config(
    raw: dict, name: str, source: str, overrides: list[str] | None = None
) -> LoadedConfig:
    """Apply `key=value` overrides to a parsed config (a preset's, or one stored in weights)."""
    overridden = apply_overrides(raw, overrides or [])
    return LoadedConfig(validate_config(raw, source, overridden), name, source)


def config_from_dict(raw: dict, source: str) -> Config:
    """Validate an already-parsed config (for example one stored in a weights file)."""
    return validate_config(raw, source, set())


def apply_overrides(raw: dict, overrides: list[str]) -> set[tuple]:
    """Apply `a.b.c=value` strings to `raw` in place; values are parsed as YAML."""
    touched = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([f"--set {item!r}: expected key=value, e.g. train.epochs=5"])
        value = parse_yaml(text, f"--set {key}") if text.strip() else None
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(map(str, parts[: depth + 1]))
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise ConfigError([f"--set {key}: {where} is not an item of the list"])
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError([f"--set {key}: {where} is not a section"])
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise ConfigError([f"--set {key}: no list item {last}"])
        elif not isinstance(node, dict):
            raise ConfigError([f"--set {key}: its parent is not a section"])
        node[last] = value
        touched.add(tuple(parts))
    return touched


def validate_config(raw: dict, source: str, overridden: set[tuple]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, raw, source, overridden) for err in exc.errors()]
        raise ConfigError(problems) from None


def _describe(err: dict, raw: dict, source: str, overridden: set[tuple]) -> str:
    loc = tuple(err["loc"])
    key_loc = _strip_tags(loc, raw)
    key = ".".join(map(str, key_loc)) or "(top level)"
    origin = "--set" if any(key_loc[: len(o)] == o for o in overridden) else source
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = (
            f"; did you mean '{'.'.join(map(str, key_loc[:-1] + (close[0],)))}'?" if close else ""
        )
        listing = f" (valid here: {', '.join(valid)})" if valid and not close else ""
        return f"{origin}: unknown key '{key}'{hint}{listing}"
    if kind == "missing":
        return f"{origin}: missing required key '{key}'"
    message = err["msg"]
    message = re.sub(r"^Input should be ", "expected ", message)
    message = re.sub(r"^Value error, ", "", message)
    if "input" in err and kind not in ("value_error", "assertion_error") and key_loc:
        return f"{origin}: {key}: {message}, got {err['input']!r}"
    return f"{origin}: {key}: {message}" if key_loc else f"{origin}: {message}"


def _strip_tags(loc: tuple, raw: dict) -> tuple:
    """Drop pydantic's union-tag entries (e.g. 'conv') so the path matches the YAML keys."""
    out: list[Any] = []
    node: Any = raw
    for part in loc:
        if isinstance(node, dict) and part not in node and isinstance(part, str):
            tag = node.get("type")
            if part == tag or (isinstance(part, str) and part.startswith("function-")):
                continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _valid_keys(loc: tuple) -> list[str]:
    """The keys allowed at a location of the schema (pydantic loc, union tags included)."""
    tp: Any = Config
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif _is_union(tp):
            tp = next((m for m in _members(tp) if _tag(m) == part), None)
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [k for k in tp.model_fields if k != "type"]
    return []


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if _is_union(tp):
        members = [m for m in _members(tp) if m is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _members(tp: Any) -> list[Any]:
    return [_unwrap(m) for m in typing.get_args(tp)]


def _tag(model: Any) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel) and "type" in model.model_fields:
        args = typing.get_args(model.model_fields["type"].annotation)
        return args[0] if args else None
    return None


def dump_config(config: Config) -> str:
    """The fully resolved configuration as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

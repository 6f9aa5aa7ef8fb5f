"""The Predictor: a model loaded from any weights aecli reads, with what batch inference needs
to know about it (input size, padding factor, device settings, latent scaling, tiling)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aecli.data.transforms import to_uint8
from aecli.devices import Execution, available_memory, resolved
from aecli.errors import UsageError
from aecli.io.latents import LatentFile, LatentScaling, fit_to_model
from aecli.io.weights import WeightsInfo, load_weights
from aecli.models import Autoencoder
from aecli.models.registry import fixed_size
from aecli.tiling import Tiling, tiled

MAX_AUTO_BATCH = 512


class Predictor:
    """A model loaded from a weights file, with what batch inference needs to know about it."""

    def __init__(self, weights: str | Path, device: torch.device | str | None = None):
        """`device`: a device resolve_device gave (used as it is), or a `--device` name."""
        self.tiling: Tiling | None = None
        self.tile_batch = 1  # tiles at a time, set with the tiling
        self._activations: dict[tuple, int] = {}
        self.device = resolved(device)
        model, info = load_weights(weights, self.device)
        self.model: Autoencoder = model
        self.info: WeightsInfo = info
        self.name = str(weights)
        self.fingerprint = info.fingerprint
        config = info.config
        self.channels = config.data.channels
        self.size: tuple[int, int] = tuple(config.data.size)
        self.value_range = config.data.range
        self.execution = Execution.for_config(self.device, config)
        self.model.to(memory_format=self.execution.memory_format)
        self.latent_shape = tuple(model.latent_shape)
        self.spatial = config.model.latent.spatial
        # Fully convolutional: any input size works, in multiples of the downsampling factor.
        blocks = [*config.model.encoder, *config.model.decoder]
        self.fully_convolutional = self.spatial and not fixed_size(blocks)
        self.factor = self.size[0] // self.latent_shape[1] if self.spatial else 1
        latent = config.model.latent
        self.scaling = LatentScaling(latent.scaling_factor, latent.shift_factor)

    def latent_scaling(
        self, scale: float | None = None, shift: float | None = None
    ) -> LatentScaling:
        """The model's latent scaling, with either factor overridden (--scaling-factor,
        --shift-factor)."""
        scaling = LatentScaling(
            self.scaling.scale if scale is None else scale,
            self.scaling.shift if shift is None else shift,
        )
        if not (np.isfinite(scaling.scale) and np.isfinite(scaling.shift) and scaling.scale > 0):
            raise UsageError(
                "--scaling-factor must be a positive number and --shift-factor a finite one"
            )
        return scaling

    @property
    def variational(self) -> bool:
        return self.model.variational

    @property
    def accepts(self) -> str:
        """The input sizes the model takes, for messages."""
        return "any size" if self.fully_convolutional else "x".join(map(str, self.size))

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Pad (replicating the border) to a multiple of the downsampling factor."""
        h, w = x.shape[-2:]
        ph, pw = -h % self.factor, -w % self.factor
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def set_tiling(self, size: int | None, overlap: int | None, batch_size: int) -> None:
        """Encode and decode in tiles of `size` pixels (--tile) sharing `overlap` pixels
        (--tile-overlap; default a quarter of the tile), `batch_size` tiles at a time."""
        if size is None:
            if overlap is not None:
                raise UsageError("--tile-overlap needs --tile SIZE")
            return
        if not self.fully_convolutional:
            raise UsageError(
                f"--tile: this model takes images of {self.accepts} only; tiling is for fully "
                "convolutional models"
            )
        f = self.factor
        if size % f or size < 2 * f:
            raise UsageError(
                f"--tile {size}: must be a multiple of the model's downsampling factor {f}, "
                f"at least {2 * f}"
            )
        overlap = size // 4 // f * f if overlap is None else overlap
        if overlap % f or not 0 <= overlap <= size // 2:
            raise UsageError(
                f"--tile-overlap {overlap}: must be a multiple of {f} from 0 to half the tile "
                f"({size // 2})"
            )
        self.tiling = Tiling(size, overlap)
        self.tile_batch = min(batch_size, self._tiles_that_fit(size))

    def _tiles_that_fit(self, size: int) -> int:
        """How many tiles at a time keep their activations within half the free memory."""
        free = available_memory(self.device)
        if free is None:
            return 1 << 30
        per_tile = self._activation_bytes("reconstruct", (self.channels, size, size))
        return max(1, free // 2 // per_tile)

    def batch_size(self, requested: int | None) -> int:
        """`--batch-size`, or its default: 32; on CUDA, for a model of a fixed input size, as
        many images as keep their activations within a quarter of the free memory, up to
        MAX_AUTO_BATCH (a small model's batches of 32 leave an H100 mostly idle)."""
        if requested is not None:
            return requested
        if self.device.type != "cuda" or self.fully_convolutional:
            return 32
        per_image = self._activation_bytes("reconstruct", (self.channels, *self.size))
        free = available_memory(self.device) or 0
        return max(32, min(MAX_AUTO_BATCH, free // 4 // per_image))

    def images_per_batch(self, batch_size: int) -> int:
        """Images to load at a time: one when tiling (--batch-size then counts tiles)."""
        return 1 if self.tiling is not None else batch_size

    def _activation_bytes(self, part: str, shape: tuple[int, ...]) -> int:
        """About the activation memory of one item of `shape` (C, H, W) through `part`
        (reconstruct or encode: an image; decode: a latent), counted once per shape."""
        key = (part, tuple(shape))
        if key not in self._activations:
            from aecli.models.builder import activation_bytes, layers

            h, w = shape[1:]
            if part == "decode":
                h, w = h * self.factor, w * self.factor
            found = layers(self.info.config, (h, w))
            if part != "reconstruct":
                stack = {"encode": "encoder", "decode": "decoder"}[part]
                found = [layer for layer in found if layer.part == stack]
            self._activations[key] = activation_bytes(found)
        return self._activations[key]

    def _check_fits(self, part: str, shape: torch.Size) -> None:
        """Refuse (one line suggesting --tile) a batch whose activations would not fit in the
        device's free memory."""
        if not self.fully_convolutional:
            return
        need = self._activation_bytes(part, tuple(shape[1:])) * shape[0]
        free = available_memory(self.device)
        if free is not None and need > free:
            h, w = shape[-2:]
            if part == "decode":
                h, w = h * self.factor, w * self.factor
            many = f"{shape[0]} images of {h}x{w}" if shape[0] > 1 else f"an image of {h}x{w}"
            raise UsageError(
                f"{many} would need about {need / 1e9:.1f} GB of activations on "
                f"{self.device}, which has {free / 1e9:.1f} GB free: pass --tile 512 (tiles of "
                "512 pixels)" + (" or a smaller --batch-size" if shape[0] > 1 else "")
            )

    def _tiled_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent head's output for one padded image (1, C, H, W), tile by tile."""
        return tiled(
            self.model.encode_raw,
            self.model.encoder,
            x,
            self.tiling,
            scale=1 / self.factor,
            batch_size=self.tile_batch,
        )

    def _tiled_image(self, z: torch.Tensor) -> torch.Tensor:
        return tiled(
            self.model.decode,
            self.model.decoder,
            z,
            self.tiling.scaled(self.factor),
            scale=self.factor,
            batch_size=self.tile_batch,
        )

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> uint8 reconstructions of the same shape, on the device
        (posterior mean for a VAE)."""
        x = self.execution.prepare(images, self.value_range)
        h, w = x.shape[-2:]
        x = self._padded(x)
        with self.execution.autocast():
            if self.tiling is not None:
                image = torch.cat(
                    [
                        self._tiled_image(self.model.posterior(self._tiled_latent(one)).mode())
                        for one in x.split(1)
                    ]
                )
            else:
                self._check_fits("reconstruct", x.shape)
                image = self.model(x, sample=False).image
        return to_uint8(image[..., :h, :w], self.value_range)

    @torch.inference_mode()
    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 latents (B, *latent_shape): the posterior mean, or a
        draw from the posterior when a generator (or one per image) is given (VAE)."""
        x = self._padded(self.execution.prepare(images, self.value_range))
        with self.execution.autocast():
            if self.tiling is not None:
                raw = torch.cat([self._tiled_latent(one) for one in x.split(1)])
            else:
                self._check_fits("encode", x.shape)
                raw = self.model.encode_raw(x)
        posterior = self.model.posterior(raw.float())
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        return z.float()

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape) -> uint8 images (B, C, H, W) on the device."""
        z = z.to(self.device, torch.float32)
        with self.execution.autocast():
            if self.tiling is not None:  # only ever set for fully convolutional models
                image = torch.cat([self._tiled_image(one) for one in z.split(1)])
            else:
                self._check_fits("decode", z.shape)
                image = self.model.decode(z)
        return to_uint8(image, self.value_range)

    def fit(self, latents: LatentFile, *, force: bool = False) -> torch.Tensor:
        """A latent file's latents as (N, *latent_shape) for this model; refused (exit 2) if
        another model wrote them, unless `force`, or if their shape does not fit."""
        return fit_to_model(
            latents,
            self.latent_shape,
            self.fingerprint,
            spatial=self.fully_convolutional,
            force=force,
            weights_name=self.name,
        )

    def generator(self, seed: int) -> torch.Generator:
        """A seeded CPU generator: noise is drawn on the CPU and copied to the device, so a seed
        gives the same draws on every device."""
        return torch.Generator().manual_seed(seed)

    def image_generators(self, seed: int, numbers: list[int]) -> list[torch.Generator]:
        """One generator per image, from `seed` and the image's number in its input list: an
        image's draw is the same whatever the batch, the shard or the process it falls in."""
        return [self.generator(image_seed(seed, n)) for n in numbers]


def image_seed(seed: int, number: int) -> int:
    """A 63-bit seed for image `number` of a run seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}/{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

"""The Predictor: a model loaded from any weights aecli reads, with what batch inference needs
to know about it (input size, padding factor, device settings, latent scaling, tiling)."""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aecli.data.transforms import to_uint8
from aecli.devices import Execution, ModelCost, available_memory, placed, resolved
from aecli.errors import UsageError, printable
from aecli.io.latents import LatentFile, LatentScaling, fit_to_model
from aecli.io.vae_families import OWN, family_of
from aecli.io.weights import WeightsInfo, load_weights
from aecli.models import Autoencoder
from aecli.models.registry import fixed_size
from aecli.tiling import NotTileable, Plan, Runner, Tiling, context, plan, tiled

MAX_AUTO_BATCH = 512


class Predictor:
    """A model loaded from a weights file, with what batch inference needs to know about it."""

    def __init__(
        self,
        weights: str | Path,
        device: torch.device | str | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        """`device`: a device resolve_device gave (used as it is), or a `--device` name.
        `notify`: where a line for the user goes (automatic tiling); default stderr."""
        self.tiling: Tiling | None = None  # --tile: always; None: where an image does not fit
        self.auto_tile, self.tile_fast = True, False  # see set_tiling
        self.tile_batch, self.tile_request = 1, 1  # tiles at a time; --batch-size
        self._plans: dict[str, Plan] = {}  # exact tiled runs of the encoder and the decoder
        self._said: set = set()  # the automatic tilings announced
        self.notify = notify or _to_stderr
        self._activations: dict[tuple, int] = {}
        self.device = resolved(device)
        model, info = load_weights(weights)
        self.model: Autoencoder = model
        self.info: WeightsInfo = info
        self.name = str(weights)
        self.fingerprint = info.fingerprint
        config = info.config
        self.channels = config.data.channels
        self.size: tuple[int, int] = tuple(config.data.size)
        self.value_range = config.data.range
        self.execution = Execution.for_config(self.device, config)
        # on the CPU the weights stay as read (a safetensors file's mapped pages): `cpu:0`
        # would copy them whole, doubling the memory a 2.7 GB VAE takes
        self.model.to(placed(self.device), memory_format=self.execution.memory_format)
        self.latent_shape = tuple(model.latent_shape)
        self.spatial = config.model.latent.spatial
        # Fully convolutional: any input size works, in multiples of the downsampling factor.
        blocks = [*config.model.encoder, *config.model.decoder]
        self.fully_convolutional = self.spatial and not fixed_size(blocks)
        self.factor = self.size[0] // self.latent_shape[1] if self.spatial else 1
        # the diffusion VAE family it is (None for aecli's own models), and its latents'
        # convention (what --scaled writes), from the one registry of families
        self.family, _ = family_of(config)
        convention = OWN if self.family is None else self.family.convention
        self.scaling = convention.scaling(config.model.latent, model.state_dict())

    def latent_scaling(
        self, scale: float | None = None, shift: float | None = None
    ) -> LatentScaling:
        """The model's latent scaling, with either factor overridden (--scaling-factor,
        --shift-factor)."""
        if scale is None and shift is None:
            return self.scaling
        if self.scaling.per_channel or self.scaling.patch != 1:
            raise UsageError(
                f"--scaling-factor / --shift-factor: {self.kind} scales its latents per channel "
                f"({self.scaling.describe()}); give --scaled alone"
            )
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
    def kind(self) -> str:
        """What the model is, for messages: `an AutoencoderTiny (TAESD, ...)`, `a plain
        autoencoder`, `a VAE`."""
        if self.family is not None:
            return f"an {self.family.name} ({self.family.models})"
        return "a VAE" if self.variational else "a plain autoencoder"

    @property
    def accepts(self) -> str:
        """The input sizes the model takes, for messages."""
        return "any size" if self.fully_convolutional else "x".join(map(str, self.size))

    @functools.cached_property
    def smallest_side(self) -> int:
        """The smallest image side a fully convolutional model takes (1 for the others, which
        see every image resized to their input). Images are padded to a multiple of the
        downsampling factor f; a norm layer needs more than one value per channel group (a
        GroupNorm of one channel per group at a 1x1 latent fails), so the model is run on blank
        images of f, 2f, ... pixels until one goes through (milliseconds: the first usually)."""
        if not self.fully_convolutional:
            return 1
        f = self.factor
        for side in range(f, 33 * f, f):
            blank = torch.zeros(1, self.channels, side, side, dtype=torch.uint8)
            try:
                with torch.inference_mode(), self.execution.autocast():
                    self.model(self.execution.prepare(blank, self.value_range), sample=False)
            except (RuntimeError, ValueError):
                continue
            return side - f + 1  # an image of that side is padded to `side`
        return 1

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Pad (replicating the border) to a multiple of the downsampling factor."""
        h, w = x.shape[-2:]
        ph, pw = -h % self.factor, -w % self.factor
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def set_tiling(
        self,
        size: int | None,
        overlap: int | None,
        batch_size: int,
        *,
        fast: bool = False,
        never: bool = False,
    ) -> None:
        """How images are tiled. `size` None: automatically, in exact tiles, where an image's
        activations would not fit in the device's free memory; 0 or `never` (--no-tile):
        never, and such an image is refused; a size (--tile): always, in tiles of `size`
        pixels. Exact tiles give the untiled result. `fast` (--tile-fast): tiles that estimate
        GroupNorm's statistics and attend within each tile (approximate), sharing `overlap`
        pixels (--tile-overlap; default a quarter of the tile). `batch_size` tiles at a time."""
        never = never or size == 0
        if never and size:
            raise UsageError(f"--no-tile and --tile {size} contradict each other: give one")
        if never and fast:
            raise UsageError("--tile-fast needs tiles: leave out --no-tile (or --tile 0)")
        if overlap is not None and not fast:
            raise UsageError(
                "--tile-overlap is for --tile-fast: exact tiles take the context the model needs"
            )
        self.auto_tile, self.tile_fast, self.tile_request = not never, fast, batch_size
        if never or size is None:
            self.tiling = None
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
        if not fast and size < self.smallest_exact_tile:
            raise UsageError(
                f"--tile {size}: exact tiles this small spend most of their time on the context "
                f"each needs ({self._context} pixels across); give at least "
                f"--tile {self.smallest_exact_tile}, or --tile-fast"
            )
        overlap = size // 4 // f * f if overlap is None else overlap
        if overlap % f or not 0 <= overlap <= size // 2:
            raise UsageError(
                f"--tile-overlap {overlap}: must be a multiple of {f} from 0 to half the tile "
                f"({size // 2})"
            )
        self.tiling = Tiling(size, overlap)
        self.tile_batch = self._tiles_at_a_time("reconstruct", size, available_memory(self.device))

    def tiling_settings(self) -> dict:
        """The tiling options, as a latent folder records them (a resume must give the same:
        --tile-fast's latents are approximate, and differ with the tile and the overlap)."""
        tiling = self.tiling
        return {
            "tile": None if tiling is None else tiling.size,
            "no_tile": not self.auto_tile,
            "tile_fast": self.tile_fast,
            "tile_overlap": tiling.overlap if tiling is not None and self.tile_fast else None,
        }

    @property
    def _context(self) -> int:
        """The most image pixels across that one output pixel of an exact tile's stage depends
        on (the stage's receptive field), in the encoder or the decoder."""
        return max(context(self._plan(part)) for part in ("encode", "decode"))

    @property
    def smallest_exact_tile(self) -> int:
        """The smallest --tile for exact tiles: twice the context, so that a tile's own pixels
        are at least half of each side it computes (at most 2.25 times the untiled work, where
        tiles of 4 pixels took over 8 times); a multiple of f, at least 2f."""
        f = self.factor
        return max(2 * f, -(-2 * self._context // f) * f)

    def _tiles_at_a_time(self, part: str, size: int, free: int | None) -> int:
        """--batch-size tiles, fewer where their activations would not fit in half the free
        memory (at least one)."""
        if free is None:
            return self.tile_request
        return max(1, min(self.tile_request, free // 2 // self._tile_bytes(part, size)))

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

    def _run(self, part: str, x: torch.Tensor, whole, tiles) -> torch.Tensor:
        """`whole(batch)` where the batch's activations fit in the device's free memory (in
        smaller batches where only those fit); else `tiles(item, tiling)` item by item."""
        if self.tiling is not None:
            return torch.cat([tiles(one, self.tiling) for one in x.split(1)])
        if not self.fully_convolutional:
            return whole(x)
        per_item = self._activation_bytes(part, tuple(x.shape[1:]))
        free = available_memory(self.device)
        if free is None or per_item * len(x) <= free:
            return whole(x)
        if per_item <= free:
            return torch.cat([whole(chunk) for chunk in x.split(free // per_item)])
        tiling = self._automatic(part, x.shape, per_item, free)
        return torch.cat([tiles(one, tiling) for one in x.split(1)])

    def _automatic(self, part: str, shape: torch.Size, need: int, free: int) -> Tiling:
        """The tiling for an item too large for the free memory: the largest tile (the
        downsampling factor times a power of two) whose activations fit in half of it; or
        the refusal, under --no-tile or where not even the smallest tile fits."""
        h, w = shape[-2:]
        if part == "decode":
            h, w = h * self.factor, w * self.factor
        what = f"an image of {h}x{w} would need about {_amount(need)} of activations on "
        what += f"{self.device}, which has {_amount(free)} free"
        if not self.auto_tile:
            raise UsageError(
                f"{what}: leave out --no-tile (or --tile 0) to work in exact tiles, which give "
                "the same result"
            )
        f, found = self.factor, None
        size = 2 * self.factor
        while size < 2 * max(h, w):
            if self._tile_bytes(part, size) > free // 2:
                break
            found, size = size, size * 2
        if found is None:
            raise UsageError(f"{what}, too little for even a tile of {2 * f} pixels")
        tiling = Tiling(found, found // 4 // f * f)
        self.tile_batch = self._tiles_at_a_time(part, found, free)
        if (part, found) not in self._said:
            self._said.add((part, found))
            kind = "approximate tiles (--tile-fast)" if self.tile_fast else "exact tiles"
            self.notify(f"note: {what}: working in {kind} of {found} pixels")
        return tiling

    def _tile_bytes(self, part: str, size: int) -> int:
        """About the activation memory of one tile of `size` image pixels through `part`."""
        if part == "decode":
            return self._activation_bytes(part, (self.latent_shape[0], *(size // self.factor,) * 2))
        return self._activation_bytes(part, (self.channels, size, size))

    def _plan(self, part: str) -> Plan:
        """The stages of the exact tiled run of the encoder (to the latent head's output) or
        the decoder."""
        if part not in self._plans:
            model = self.model
            try:
                if part == "encode":
                    self._plans[part] = plan([model.encoder, model.latent_head])
                else:
                    parts = [model.decoder, model.to_image]
                    self._plans[part] = plan(parts, Fraction(1, self.factor))
            except NotTileable as exc:
                raise UsageError(
                    f"this model holds {exc}, which exact tiles do not cover: pass --tile-fast"
                ) from None
        return self._plans[part]

    def _runner(self, part: str, tiling: Tiling) -> Runner:
        """The exact tiled run of the encoder (to the latent head's output) or the decoder."""
        stages = self._plan(part)
        free = available_memory(self.device)
        host = free if self.device.type == "cpu" else available_memory(torch.device("cpu"))
        return Runner(
            stages,
            tiling.size,
            device=placed(self.device),  # what `.to` takes: a CPU tensor is not copied
            batch=self.tile_batch,
            memory_format=self.execution.memory_format,
            notify=self.notify,
            attention_fits=lambda need: free is None or need <= free // 2,
            # half the host's free memory for whole tensors between stages (the other half
            # holds the tiles' own on the CPU); files in $TMPDIR beyond it
            host_budget=None if host is None else host // 2,
        )

    def _tiled(self, part: str, x: torch.Tensor, tiling: Tiling) -> torch.Tensor:
        """One padded image's latent head output (`part` encode) or one latent's image in the
        data range (decode), tile by tile: exact tiles, or --tile-fast's."""
        if not self.tile_fast:
            return self._runner(part, tiling)(x)
        model, f = self.model, self.factor
        if part == "encode":
            return tiled(model.encode_raw, model.encoder, x, tiling, scale=1 / f,
                         batch_size=self.tile_batch)  # fmt: skip
        return tiled(model.decode, model.decoder, x, tiling.scaled(f), scale=f,
                     batch_size=self.tile_batch)  # fmt: skip

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> uint8 reconstructions of the same shape, on the device
        (posterior mean for a VAE)."""
        x = self.execution.prepare(images, self.value_range)
        h, w = x.shape[-2:]
        x = self._padded(x)

        def tiles(one: torch.Tensor, tiling: Tiling) -> torch.Tensor:
            mean = self.model.posterior(self._tiled("encode", one, tiling)).mode()
            return self._tiled("decode", mean, tiling)

        with self.execution.autocast():
            image = self._run(
                "reconstruct", x, lambda batch: self.model(batch, sample=False).image, tiles
            )
        return to_uint8(image[..., :h, :w], self.value_range)

    def set_precision(self, precision: str) -> None:
        """Run the model in `precision` (auto, fp32, bf16: as `train.precision`) instead of
        its config's; `encode` computes in fp32 whatever its latents are stored in."""
        config = self.info.config
        cost = self.execution.cost
        if cost is None and self.device.type == "cuda" and precision == "auto":
            cost = ModelCost.of(config)
        self.execution = Execution(self.device, precision, config.train.memory_format, cost)
        self.model.to(memory_format=self.execution.memory_format)

    @torch.inference_mode()
    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 latents (B, *latent_shape): the posterior mean, or a
        draw from the posterior when a generator (or one per image) is given (VAE)."""
        posterior = self._posterior(images)
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        return z.float()

    @torch.inference_mode()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W) -> the posterior's mean and standard deviation, float32 (B,
        *latent_shape) each (a VAE's)."""
        posterior = self._posterior(images)
        return posterior.mean.float(), torch.exp(0.5 * posterior.logvar).float()

    def _posterior(self, images: torch.Tensor):
        x = self._padded(self.execution.prepare(images, self.value_range))
        with self.execution.autocast():
            raw = self._run(
                "encode", x, self.model.encode_raw, lambda one, t: self._tiled("encode", one, t)
            )
        return self.model.posterior(raw.float())

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape) -> uint8 images (B, C, H, W) on the device."""
        z = z.to(placed(self.device), torch.float32)
        if z.dim() == 4:  # in the layout the model runs in, as images are by its first conv
            z = z.contiguous(memory_format=self.execution.memory_format)
        with self.execution.autocast():
            image = self._run(
                "decode", z, self.model.decode, lambda one, t: self._tiled("decode", one, t)
            )
        return to_uint8(image, self.value_range)

    def fit(
        self,
        latents: LatentFile,
        *,
        force: bool = False,
        scaling: LatentScaling | None = None,
    ) -> torch.Tensor:
        """A latent file's latents as (N, *latent_shape) for this model, `scaling` undone (the
        latents then have its scaled shape); refused (exit 2) if another model wrote them,
        unless `force`, or if their shape does not fit."""
        shape = self.latent_shape if scaling is None else scaling.scaled_shape(self.latent_shape)
        z = fit_to_model(
            latents,
            shape,
            self.fingerprint,
            spatial=self.fully_convolutional,
            force=force,
            weights_name=self.name,
        )
        return z if scaling is None else scaling.undo(z)

    def generator(self, seed: int) -> torch.Generator:
        """A seeded CPU generator: noise is drawn on the CPU and copied to the device, so a seed
        gives the same draws on every device."""
        return torch.Generator().manual_seed(seed)

    def image_generators(
        self, seed: int, numbers: list[int], *, flip: bool = False
    ) -> list[torch.Generator]:
        """One generator per image, from `seed` and the image's number in its input list: an
        image's draw is the same whatever the batch, the shard or the process it falls in.
        `flip`: its mirror image's, another stream."""
        return [self.generator(image_seed(seed, n, flip=flip)) for n in numbers]


def image_seed(seed: int, number: int, *, flip: bool = False) -> int:
    """A 63-bit seed for image `number` of a run seeded with `seed` (`flip`: for its mirror
    image, another)."""
    key = f"{seed}/{number}" + ("/flip" if flip else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _to_stderr(line: str) -> None:
    sys.stderr.write(printable(line) + "\n")
    sys.stderr.flush()


def _amount(count: int) -> str:
    """Bytes for a message: 26.8 GB, 7.9 MB."""
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"

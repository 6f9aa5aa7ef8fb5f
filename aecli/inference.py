"""Batched inference with a trained model: reconstruct, encode, decode and diff image files.

Files are decoded by DataLoader workers (through the one safe image reader) while the
model runs on batches under `inference_mode`; a file that cannot be read becomes a Failure
record and the batch goes on.
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from aecli.data.images import (
    IMAGE_SUFFIXES,
    Failure,
    ImageReadError,
    fit_image,
    list_images,
    read_image,
)
from aecli.data.sources import folder_labels
from aecli.data.transforms import to_uint8
from aecli.devices import Execution, available_memory, resolve_device
from aecli.errors import UsageError
from aecli.io.images import compose_sheet, diverging, heatmap, save_png
from aecli.io.latents import LatentFile, LatentScaling, fit_to_model
from aecli.io.weights import WeightsInfo, load_weights
from aecli.losses import mse_per_image, psnr_from_mse, ssim
from aecli.models import Autoencoder
from aecli.tiling import Tiling, tiled

Progress = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


# -- the model -------------------------------------------------------------------------------


class Predictor:
    """A model loaded from a weights file, with what batch inference needs to know about it."""

    def __init__(self, weights: str | Path, device: str | None = None):
        self.tiling: Tiling | None = None
        self.tile_batch = 8
        self._activations: dict[tuple, int] = {}
        self.device = resolve_device(device)
        model, info = load_weights(weights, self.device)
        self.model: Autoencoder = model
        self.info: WeightsInfo = info
        self.name = str(weights)
        self.fingerprint = info.fingerprint
        config = info.config
        self.channels = config.data.channels
        self.size: tuple[int, int] = tuple(config.data.size)
        self.value_range = config.data.range
        self.execution = Execution(self.device, config.train.precision, config.train.memory_format)
        self.model.to(memory_format=self.execution.memory_format)
        self.latent_shape = tuple(model.latent_shape)
        self.spatial = config.model.latent.spatial
        fixed = {"linear", "flatten", "reshape", "resize"}
        blocks = [*config.model.encoder, *config.model.decoder]
        # Fully convolutional: any input size works, in multiples of the downsampling factor.
        self.fully_convolutional = self.spatial and not any(b.type in fixed for b in blocks)
        self.factor = self.size[0] // self.latent_shape[1] if self.spatial else 1
        latent = config.model.latent
        self.scaling = LatentScaling(latent.scaling_factor, latent.shift_factor)

    def latent_scaling(self, scale: float | None = None, shift: float | None = None):
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
        self.tiling, self.tile_batch = Tiling(size, overlap), batch_size

    def images_per_batch(self, batch_size: int) -> int:
        """Images to load at a time: one when tiling (--batch-size then counts tiles)."""
        return 1 if self.tiling is not None else batch_size

    def _check_fits(self, part: str, shape: torch.Size) -> None:
        """Refuse (one line suggesting --tile) a batch whose activations would not fit in the
        device's free memory."""
        if not self.fully_convolutional:
            return
        key = (part, tuple(shape[1:]))
        if key not in self._activations:
            from aecli.models.builder import activation_bytes, build_model

            meta = build_model(self.info.config, meta=True)
            c, h, w = shape[1:]
            if part == "decode":
                self._activations[key] = activation_bytes(meta.decoder, (1, c, h, w))
            else:
                latent = (1, self.latent_shape[0], h // self.factor, w // self.factor)
                need = activation_bytes(meta.encoder, (1, c, h, w))
                if part == "reconstruct":
                    need = max(need, activation_bytes(meta.decoder, latent))
                self._activations[key] = need
        need = self._activations[key] * shape[0]
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
        tiling = self.tiling
        return tiled(
            self.model.encode_raw,
            self.model.encoder,
            x,
            tiling,
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
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 latents (B, *latent_shape): the posterior mean, or a
        draw from the posterior when a generator is given (VAE)."""
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
            if self.tiling is not None and self.spatial:
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


# -- reading files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # relative to the input folder it was found in (the file name for a file)


def collect_inputs(inputs: list[Path]) -> tuple[list[InputFile], list[Failure]]:
    """The image files that INPUT arguments name (folders recursively), in a stable order."""
    files: list[InputFile] = []
    failures: list[Failure] = []
    for given in inputs:
        if not given.exists() and not given.is_symlink():
            raise UsageError("input does not exist", path=given)
        if given.is_dir():
            found, problems = list_images([given])
            files += [InputFile(file, file.relative_to(given).as_posix()) for _, file in found]
            failures += problems
        else:
            files.append(InputFile(given, given.name))
    if not files and not failures:
        raise UsageError(
            f"no image files found in {', '.join(map(str, inputs))} "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files, failures


@dataclass
class ImageBatch:
    indices: list[int]
    images: torch.Tensor  # uint8 (B, C, H, W)
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.indices)

    def __add__(self, other: ImageBatch) -> ImageBatch:
        return ImageBatch(
            self.indices + other.indices,
            torch.cat([self.images, other.images]),
            self.original_sizes + other.original_sizes,
        )

    def split(self, n: int) -> tuple[ImageBatch, ImageBatch]:
        """The first n images, and the rest."""
        head = ImageBatch(self.indices[:n], self.images[:n], self.original_sizes[:n])
        return head, ImageBatch(self.indices[n:], self.images[n:], self.original_sizes[n:])


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) pixels -> uint8 (C, H, W), sharing memory where it can."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)


class _ImageFiles(Dataset):
    """Decodes one file per item (in a worker): uint8 (C, H, W), resized when `size` is set."""

    def __init__(
        self,
        files: list[InputFile],
        channels: int,
        size: tuple[int, int] | None,
        reduced_decode: bool = True,
    ):
        self.files, self.channels, self.size = files, channels, size
        # JPEGs that will be resized down anyway can decode at 1/2, 1/4 or 1/8 scale
        self.at_least = max(size) if size is not None and reduced_decode else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            array = read_image(self.files[index].path, self.channels, at_least=self.at_least)
        except ImageReadError as exc:
            return index, Failure(exc.path, exc.reason), None
        original = array.shape[:2]
        if self.size is not None:
            array = fit_image(array, self.size, "stretch")
        return index, image_tensor(array), original


def _group_by_shape(items):
    """Collate: stack same-sized images (one tensor per size), pass failures through."""
    groups: dict[tuple, list] = {}
    failures = []
    for index, image, original in items:
        if isinstance(image, Failure):
            failures.append((index, image))
        else:
            groups.setdefault(tuple(image.shape), []).append((index, image, original))
    stacked = [
        ImageBatch(
            [i for i, _, _ in group],
            torch.stack([image for _, image, _ in group]),
            [tuple(o) for _, _, o in group],
        )
        for group in groups.values()
    ]
    return stacked, failures


def default_workers(count: int, batch_size: int) -> int:
    """Decode in the main process for a batch or less; else up to 8 worker processes."""
    if count <= batch_size:
        return 0
    return min(8, max(1, (os.cpu_count() or 2) - 1))


def load_batches(
    files: list[InputFile],
    channels: int,
    size: tuple[int, int] | None,
    batch_size: int,
    workers: int | None = None,
    *,
    failures: dict[int, Failure],
    progress: Progress = _no_progress,
    original_sizes: bool = False,
) -> Iterator[ImageBatch]:
    """Decoded images in batches of one size each (`size` None keeps native sizes).

    Files that cannot be read go into `failures` by index (and count as done for `progress`).
    `original_sizes` makes each batch's `original_sizes` exact (no reduced-scale JPEG decoding).
    """
    workers = default_workers(len(files), batch_size) if workers is None else workers
    loader = DataLoader(
        _ImageFiles(files, channels, size, reduced_decode=not original_sizes),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_group_by_shape,
        prefetch_factor=4 if workers else None,
    )
    pending: dict[tuple, ImageBatch] = {}  # per image size, fewer than batch_size images
    for groups, failed in loader:
        failures.update(failed)
        progress(len(failed))
        for group in groups:
            key = tuple(group.images.shape[1:])
            if key in pending:
                group = pending.pop(key) + group
            while len(group) >= batch_size:
                head, group = group.split(batch_size)
                yield head
            if len(group):
                pending[key] = group
    yield from pending.values()


# -- metrics ---------------------------------------------------------------------------------


def image_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR (dB) and SSIM of uint8 (B, C, H, W) images, on [0, 1] values."""
    a, b = original.float() / 255.0, reconstruction.float() / 255.0
    mse = mse_per_image(b, a)
    return {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": ssim(b, a, reduction="none")}


def summarize_metrics(rows: list[dict]) -> dict[str, float]:
    """Means over images of each metric."""
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in ("mse", "psnr", "ssim")}


# -- writing outputs -------------------------------------------------------------------------


def plan_outputs(files: list[InputFile], out_dir: Path) -> list[Path]:
    """One PNG per input, keeping relative paths. `a.jpg` and `a.png` side by side keep their
    suffix (`a.jpg.png`, `a.png.png`); other clashes (the same name in two inputs) are refused."""
    stems = [Path(f.name).with_suffix(".png").as_posix() for f in files]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = [
        stem if counts[stem] == 1 else f"{f.name}.png" for stem, f in zip(stems, files, strict=True)
    ]
    seen: dict[str, InputFile] = {}
    for name, file in zip(names, files, strict=True):
        if name in seen:
            raise UsageError(
                f"{seen[name].path} and {file.path} would both be written to "
                f"{out_dir / name}; reconstruct those inputs into separate folders"
            )
        seen[name] = file
    return [out_dir / name for name in names]


class PngWriter:
    """Encodes and writes batch PNGs on a few threads (Pillow releases the GIL while
    compressing), a bounded number in flight; leaving the `with` block waits for all."""

    def __init__(self, threads: int = 4):
        self.pool = ThreadPoolExecutor(threads)
        self.pending: deque[Future] = deque()
        self.limit = threads * 4

    def save(self, path: Path, array: np.ndarray) -> None:
        self.pending.append(self.pool.submit(save_png, path, array, batch=True))
        if len(self.pending) > self.limit:
            self.pending.popleft().result()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown()


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


# -- reconstruct -----------------------------------------------------------------------------


@dataclass
class Reconstruction:
    rows: list[dict]  # per image, input order: file, output, and mse / psnr / ssim if measured
    failures: list[Failure]
    grid: np.ndarray | None = None
    overall: dict[str, float] = field(default_factory=dict)


def reconstruct_files(
    predictor: Predictor,
    files: list[InputFile],
    outputs: list[Path] | None,
    *,
    keep_size: bool = False,
    metrics: bool = False,
    grid_count: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = _no_progress,
) -> Reconstruction:
    """Reconstruct every file (writing outputs[i] for files[i] when outputs are given).

    Vector-latent models see each image resized to their input size (`keep_size` resizes the
    reconstruction back); fully convolutional models work at each image's own size. Metrics
    compare the reconstruction with the image the model saw, as 8-bit values.
    """
    size = None if predictor.fully_convolutional else predictor.size
    rows: dict[int, dict] = {}
    failures: dict[int, Failure] = {}
    grid: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    batches = load_batches(
        files,
        predictor.channels,
        size,
        predictor.images_per_batch(batch_size),
        workers,
        failures=failures,
        progress=progress,
        original_sizes=keep_size,
    )
    with PngWriter() as writer:
        for batch in batches:
            recon = predictor.reconstruct(batch.images)
            scores = image_metrics(batch.images.to(recon.device), recon) if metrics else {}
            scores = {k: v.tolist() for k, v in scores.items()}
            recon_cpu = recon.cpu()
            for j, index in enumerate(batch.indices):
                image = _hwc(recon_cpu[j])
                if keep_size and image.shape[:2] != batch.original_sizes[j]:
                    image = fit_image(image, batch.original_sizes[j], "stretch")
                row = {"file": str(files[index].path)}
                if outputs is not None:
                    writer.save(outputs[index], image)
                    row["output"] = str(outputs[index])
                row.update({k: v[j] for k, v in scores.items()})
                rows[index] = row
                if index < grid_count:
                    grid[index] = (_hwc(batch.images[j]), _hwc(recon_cpu[j]))
            progress(len(batch))
    ordered = [rows[i] for i in sorted(rows)]
    result = Reconstruction(ordered, [failures[i] for i in sorted(failures)])
    if grid:
        result.grid = originals_over_reconstructions([grid[i] for i in sorted(grid)])
    if metrics:
        result.overall = summarize_metrics(ordered)
    return result


def originals_over_reconstructions(
    pairs: list[tuple[np.ndarray, np.ndarray]], columns: int = 8
) -> np.ndarray:
    """A sheet of rows of up to `columns` originals, each over its reconstructions."""
    rows: list[list[np.ndarray]] = []
    for start in range(0, len(pairs), columns):
        chunk = pairs[start : start + columns]
        rows += [[a for a, _ in chunk], [b for _, b in chunk]]
    return compose_sheet(rows)


# -- encode / decode -------------------------------------------------------------------------


def encode_files(
    predictor: Predictor,
    files: list[InputFile],
    *,
    size: tuple[int, int] | None | str = "model",
    sample: bool = False,
    seed: int = 0,
    scaling: LatentScaling | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = _no_progress,
) -> tuple[LatentFile, list[Failure]]:
    """Encode files into one latent file, each resized to `size` ("model": the model's input
    size; None: each image's own size, for fully convolutional models, all images alike).

    Labels come from subfolder names when every file sits in a subfolder of an input folder
    (as for training), numbered by the weights' class names when they cover them all.
    `scaling` writes the latents as diffusion models consume them, and records it.
    """
    size = predictor.size if size == "model" else size
    generator = predictor.generator(seed) if sample else None
    latents: dict[int, torch.Tensor] = {}
    failures: dict[int, Failure] = {}
    first: tuple[int, tuple] | None = None  # the first batch's file and image size
    for batch in load_batches(
        files,
        predictor.channels,
        size,
        predictor.images_per_batch(batch_size),
        workers,
        failures=failures,
        progress=progress,
    ):
        shape = tuple(batch.images.shape[-2:])
        if first is None:
            first = (batch.indices[0], shape)
        elif shape != first[1]:
            a, b = files[first[0]].path, files[batch.indices[0]].path
            raise UsageError(
                f"{a} is {_size_text(first[1])} but {b} is {_size_text(shape)}: one latent "
                "file holds latents of one size; encode them separately or pass --size"
            )
        z = predictor.encode(batch.images, generator)
        z = (scaling.apply(z) if scaling is not None else z).cpu()
        latents.update(zip(batch.indices, z, strict=True))
        progress(len(batch))
    order = sorted(latents)
    if not order:
        return LatentFile(torch.empty(0)), [failures[i] for i in sorted(failures)]
    kept = [files[i] for i in order]
    labels, class_names = folder_labels([Path(f.name) for f in kept], predictor.info.class_names)
    result = LatentFile(
        torch.stack([latents[i] for i in order]),
        None if labels is None else torch.tensor(labels, dtype=torch.int64),
        predictor.fingerprint,
        [f.name for f in kept],
        class_names,
        scaling=scaling,
    )
    return result, [failures[i] for i in sorted(failures)]


def _size_text(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def decoded_images(
    predictor: Predictor,
    latents: torch.Tensor,
    *,
    batch_size: int = 32,
    progress: Progress = _no_progress,
) -> Iterator[np.ndarray]:
    """uint8 (H, W, C) images for (N, *latent_shape) latents, decoded a batch at a time."""
    for start in range(0, len(latents), batch_size):
        for image in predictor.decode(latents[start : start + batch_size]).cpu():
            yield _hwc(image)
            progress(1)


def is_grid(out: Path) -> bool:
    """`-o name.png` asks for one sheet; anything else is a folder of PNGs."""
    return out.suffix.lower() == ".png"


def image_outputs(out: Path, names: list[str]) -> list[Path]:
    """The files `write_images` writes: the sheet, or one PNG per name in the folder."""
    return [out] if is_grid(out) else [out / name for name in names]


def write_images(
    images: Iterable[np.ndarray], out: Path, names: list[str], *, columns: int = 8
) -> None:
    """Images into one sheet (`columns` per row) for `-o name.png`, else into the folder `out`
    as one PNG per image, named by `names` (written on threads as the images arrive)."""
    if is_grid(out):
        images = list(images)
        rows = [images[i : i + columns] for i in range(0, len(images), columns)]
        save_png(out, compose_sheet(rows))
        return
    with PngWriter() as writer:
        for path, image in zip(image_outputs(out, names), images, strict=True):
            writer.save(path, image)


def decoded_names(sources: list[str] | None, count: int) -> list[str]:
    """File names for decoded latents: each source name as .png (relative folders kept) when
    they are distinct and stay inside the output folder; else 000000.png, 000001.png, ..."""
    if sources:
        names = [Path(s).with_suffix(".png") for s in sources]
        safe = all(not n.is_absolute() and ".." not in n.parts for n in names)
        if safe and len({n.as_posix() for n in names}) == count:
            return [n.as_posix() for n in names]
    width = max(6, len(str(count - 1)))
    return [f"{i:0{width}d}.png" for i in range(count)]


# -- diff ------------------------------------------------------------------------------------


@dataclass
class Diff:
    rows: list[dict]  # per image, worst first: file, mse, psnr, ssim (+ vs_* and winner)
    failures: list[Failure]
    sheet: np.ndarray | None
    overall: dict[str, float]
    vs_overall: dict[str, float] | None = None
    error_scale: float = 0.0


def diff_files(
    predictor: Predictor,
    files: list[InputFile],
    *,
    vs: Predictor | None = None,
    top: int = 8,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = _no_progress,
) -> Diff:
    """Per-image errors of one model (or two, `vs`), worst first by the first model's MSE, and a
    sheet of the `top` worst: original, reconstruction(s) and error maps side by side."""
    if vs is not None:
        _check_comparable(predictor, vs)
    size = None if predictor.fully_convolutional else predictor.size
    rows: list[dict] = []
    failures: dict[int, Failure] = {}
    worst: list[tuple[float, int, dict]] = []  # a min-heap of the `top` largest MSEs
    models = [predictor] if vs is None else [predictor, vs]
    for batch in load_batches(
        files, predictor.channels, size, batch_size, workers, failures=failures, progress=progress
    ):
        recons = [m.reconstruct(batch.images) for m in models]
        originals = batch.images.to(recons[0].device)
        scores = [{k: v.tolist() for k, v in image_metrics(originals, r).items()} for r in recons]
        recons_cpu = [r.cpu() for r in recons]
        for j, index in enumerate(batch.indices):
            row = {"file": str(files[index].path), **{k: v[j] for k, v in scores[0].items()}}
            if vs is not None:
                row.update({f"vs_{k}": v[j] for k, v in scores[1].items()})
                row["winner"] = _winner(row["mse"], row["vs_mse"])
            rows.append(row)
            key = (row["mse"], -index)
            if top > 0 and (len(worst) < top or key > worst[0][:2]):
                images = {
                    "original": batch.images[j].clone(),
                    "recons": [r[j].clone() for r in recons_cpu],
                }
                entry = (*key, {"row": row, **images})
                if len(worst) < top:
                    heapq.heappush(worst, entry)
                else:
                    heapq.heapreplace(worst, entry)
        progress(len(batch))
    rows.sort(key=lambda r: (-r["mse"], r["file"]))
    shown = [entry[2] for entry in sorted(worst, key=lambda e: (-e[0], -e[1]))]
    sheet, scale = _diff_sheet(shown, vs is not None) if shown else (None, 0.0)
    vs_overall = None
    if vs is not None:
        vs_overall = {
            k: float(np.mean([r[f"vs_{k}"] for r in rows])) if rows else 0.0
            for k in ("mse", "psnr", "ssim")
        }
    failed = [failures[i] for i in sorted(failures)]
    return Diff(rows, failed, sheet, summarize_metrics(rows), vs_overall, scale)


def _winner(a: float, b: float) -> str:
    if np.isclose(a, b, rtol=1e-6, atol=1e-12):
        return "tie"
    return "weights" if a < b else "vs"


def _check_comparable(a: Predictor, b: Predictor) -> None:
    if a.channels != b.channels:
        raise UsageError(
            f"--vs: {b.name} takes {b.channels}-channel images, {a.name} takes {a.channels}; "
            "diff compares two models on the same images"
        )
    if a.fully_convolutional != b.fully_convolutional or (
        not a.fully_convolutional and a.size != b.size
    ):
        raise UsageError(
            f"--vs: {b.name} takes images of {b.accepts}, {a.name} of {a.accepts}; "
            "diff compares two models on the same inputs"
        )


def _diff_sheet(shown: list[dict], versus: bool) -> tuple[np.ndarray, float]:
    """Rows of original, reconstruction, signed error (channel mean; blue darker, red brighter)
    and absolute error (channel mean), one colour scale for the whole sheet."""
    errors = [
        [(r.float() - s["original"].float()).mean(dim=0) / 255.0 for r in s["recons"]]
        for s in shown
    ]
    magnitudes = torch.cat([e.abs().flatten() for row in errors for e in row])
    # The 99.5th percentile, so that a few extreme pixels do not wash out the rest.
    scale = max(float(torch.quantile(magnitudes[:1_000_000], 0.995)), 1.0 / 255.0)
    rows, captions = [], []
    for item, errs in zip(shown, errors, strict=True):
        row = item["row"]
        cells = [_hwc(item["original"])] + [_hwc(r) for r in item["recons"]]
        if versus:
            cells += [heatmap((e.abs() / scale).numpy()) for e in errs]
            captions.append(
                f"{Path(row['file']).name}   {row['psnr']:.2f} dB vs {row['vs_psnr']:.2f} dB"
            )
        else:
            cells += [
                diverging((errs[0] / scale).numpy()),
                heatmap((errs[0].abs() / scale).numpy()),
            ]
            captions.append(
                f"{Path(row['file']).name}   PSNR {row['psnr']:.2f} dB   SSIM {row['ssim']:.3f}"
            )
        rows.append(cells)
    limit = f"±{scale:.2f}"
    header = (
        ["original", "weights", "vs", f"|error| 0-{scale:.2f}", f"|vs error| 0-{scale:.2f}"]
        if versus
        else ["original", "reconstruction", f"signed error {limit}", f"|error| 0-{scale:.2f}"]
    )
    return compose_sheet(rows, min_tile=128, header=header, captions=captions), scale

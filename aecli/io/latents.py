"""Latent files: safetensors with `latents`, optional `labels` and metadata naming the model;
`.npy` for numpy tools; `-` for stdin / stdout so that commands chain.

Beside `latents` (the posterior's mean, a draw from it, or a deterministic model's code), a
file may hold `latents_std` (the posterior's standard deviation: `encode --store moments`),
`latents_flip` (the latents of each image's mirror image: `encode --flip`) and
`latents_flip_std`, each of the latents' shape, all stored in one dtype: float32, bfloat16 or
float16 (`encode --dtype`). Read, every tensor is float32.
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

import aecli
from aecli.errors import UsageError, first_line
from aecli.io.atomic import atomic_write_bytes, is_stream
from aecli.io.tensorfile import safetensors_header, tensor_file_parts

FORMAT = "aecli-latents"
FORMAT_VERSION = "1"
STDIO = "-"
_NPY_MAGIC = b"\x93NUMPY"


class LatentFileError(UsageError):
    """A latent file is missing, unreadable, or does not fit the model; exit 2."""


# what a latent file holds beside `latents`: LatentFile's field -> the tensor's name
STORED = {
    "latents": "latents",
    "std": "latents_std",
    "flip": "latents_flip",
    "flip_std": "latents_flip_std",
}
# the dtypes latents are stored in: --dtype's name -> torch's, and safetensors' names for them
STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class LatentScaling:
    """Latents as diffusion models consume them: (patchify(z) - shift) * scale. `scale` and
    `shift` are one number (Stable Diffusion's scaling factor; SD3 and FLUX.1 also shift) or
    one per channel of the patchified latent (FLUX.2's BatchNorm statistics); `patch`: the
    side of the squares of latent pixels that become channels, (C, H, W) -> (C p^2, H/p, W/p),
    in the order of FLUX.2's `_patchify_latents` (1: none)."""

    scale: float | tuple[float, ...]
    shift: float | tuple[float, ...] = 0.0
    patch: int = 1

    def _factors(self, z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        def of(value):
            if isinstance(value, tuple):
                return torch.tensor(value, dtype=z.dtype, device=z.device).view(-1, 1, 1)
            return value

        return of(self.scale), of(self.shift)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C p^2, H/p, W/p), shifted and scaled."""
        scale, shift = self._factors(z)
        return (self._patchify(z) - shift) * scale

    def apply_spread(self, std: torch.Tensor) -> torch.Tensor:
        """A standard deviation of latents as `apply` moves and scales them: patched alike,
        times |scale| (a shift moves no spread)."""
        scale, _ = self._factors(std)
        return self._patchify(std) * abs(scale)  # abs() of a number or of a tensor

    def undo(self, z: torch.Tensor) -> torch.Tensor:
        scale, shift = self._factors(z)
        return self._unpatchify(z / scale + shift)

    def _patchify(self, z: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if p == 1:
            return z
        b, c, h, w = z.shape
        if h % p or w % p:
            raise UsageError(
                f"a latent of {h}x{w} does not split into the {p}x{p} patches this model's "
                f"pipelines take: give images whose sides are multiples of {p} latent pixels"
            )
        z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, c * p * p, h // p, w // p)  # (B, C p^2, H/p, W/p)

    def _unpatchify(self, z: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if p == 1:
            return z
        b, c, h, w = z.shape
        z = z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // (p * p), h * p, w * p)  # (B, C / p^2, H p, W p)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.scale, tuple) or isinstance(self.shift, tuple)

    @property
    def identity(self) -> bool:
        return (self.scale, self.shift, self.patch) == (1.0, 0.0, 1)

    def scaled_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of scaled latents for unscaled ones of `shape` (C, H, W)."""
        p = self.patch
        return shape if p == 1 else (shape[0] * p * p, shape[1] // p, shape[2] // p)

    def channel_factors(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) per channel of the unscaled latent, float64: a patched latent's
        channel averages its patch positions' shifts and takes the RMS of their spreads."""
        shift = torch.as_tensor(self.shift, dtype=torch.float64).expand(channels * self.patch**2)
        scale = torch.as_tensor(self.scale, dtype=torch.float64).expand(channels * self.patch**2)
        spread = scale.reshape(channels, -1).pow(-2).mean(1).sqrt()
        return shift.reshape(channels, -1).mean(1), 1 / spread

    def record(self) -> dict:
        """What a latent file or folder records: {scale, shift[, patch]}."""
        found = {"scale": _listed(self.scale), "shift": _listed(self.shift)}
        return found if self.patch == 1 else {**found, "patch": self.patch}

    @classmethod
    def from_record(cls, raw) -> LatentScaling:
        """The scaling a record describes; ValueError for anything but finite factors (one
        number, or one per channel) with positive scales and a patch from 1 to 8."""
        if not isinstance(raw, dict):
            raise ValueError("scaling is not a record")
        patch = raw.get("patch", 1)
        if isinstance(patch, bool) or not isinstance(patch, int) or not 1 <= patch <= 8:
            raise ValueError(f"scaling patch {str(patch)[:20]} is not from 1 to 8")
        scale, shift = _factor(raw.get("scale")), _factor(raw.get("shift"))
        sizes = {len(v) for v in (scale, shift) if isinstance(v, tuple)}
        if len(sizes) > 1 or min(_values(scale)) <= 0:
            raise ValueError("scaling: its scales are not positive, or not one per channel")
        return cls(scale, shift, patch)

    def describe(self) -> str:
        """`(z - 0.1159) * 0.3611`; `(patchify 2x2(z) - shift) * scale, per channel (128)`"""
        z = "z" if self.patch == 1 else f"patchify {self.patch}x{self.patch}(z)"
        if not self.per_channel:
            return f"({z} - {self.shift:g}) * {self.scale:g}"
        scale = torch.tensor(_values(self.scale))
        shift = torch.tensor(_values(self.shift))
        return (
            f"({z} - shift) * scale, per channel ({max(len(scale), len(shift))}: shift "
            f"{shift.min():.4g} to {shift.max():.4g}, scale {scale.min():.4g} to "
            f"{scale.max():.4g})"
        )


def _listed(value: float | tuple[float, ...]) -> float | list[float]:
    return list(value) if isinstance(value, tuple) else value


def _values(value: float | tuple[float, ...]) -> tuple[float, ...]:
    return value if isinstance(value, tuple) else (value,)


def _factor(value) -> float | tuple[float, ...]:
    """A finite number, or a list of 1 to 65536 of them, from a record."""
    many = isinstance(value, list)
    values = value if many else [value]
    if not 1 <= len(values) <= 65536 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError("scaling: a factor is not a finite number or a list of them")
    return tuple(float(v) for v in values) if many else float(values[0])


@dataclass
class LatentFile:
    """Latent codes (N, ...) with where they came from."""

    latents: torch.Tensor
    labels: torch.Tensor | None = None
    fingerprint: str | None = None  # of the weights that wrote them; None for .npy
    sources: list[str] | None = None  # one name per latent (an input file, or how it was made)
    class_names: list[str] | None = None
    name: str = ""  # where it was read from, for messages
    scaling: LatentScaling | None = None  # how `latents` were scaled, if they were
    std: torch.Tensor | None = None  # latents_std: the posterior's standard deviation
    flip: torch.Tensor | None = None  # latents_flip: each image's mirror image's latents
    flip_std: torch.Tensor | None = None  # latents_flip_std
    dtype: str = "float32"  # what the latents are stored in (a STORAGE name)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors a file holds of them, under their names in it: `latents`, and
        `latents_std`, `latents_flip`, `latents_flip_std` where there are."""
        found = {name: getattr(self, field) for field, name in STORED.items()}
        return {name: tensor for name, tensor in found.items() if tensor is not None}

    def rows(self, index) -> dict:
        """`index` (a slice, a list of numbers) of every stored tensor, as LatentFile fields."""
        return {
            field: None if getattr(self, field) is None else getattr(self, field)[index]
            for field in STORED
        }


def latent_bytes(latents: LatentFile, fmt: str = "safetensors") -> bytes:
    """Serialise to the safetensors latent format, or to a plain .npy array (latents only, in
    float32 or float16)."""
    if fmt == "npy":
        if len(latents.stored()) > 1 or latents.dtype == "bfloat16":
            raise UsageError(npy_refusal(latents))
        buffer = io.BytesIO()
        np.save(buffer, _stored_array(latents, "latents")[0], allow_pickle=False)
        return buffer.getvalue()
    return b"".join(latent_parts(latents)[0])


def npy_refusal(latents: LatentFile) -> str:
    """Why a .npy file cannot hold these latents, in one line."""
    if latents.dtype == "bfloat16":
        return "a .npy file cannot hold bfloat16 (numpy has no such type); write .safetensors"
    extra = ", ".join(n for n in latents.stored() if n != "latents")
    return f"a .npy file holds the latents alone, not {extra}; write .safetensors or a folder"


def latent_parts(latents: LatentFile) -> tuple[list[bytes | memoryview], int]:
    """The safetensors latent file as parts to write one after another (no copy of float32
    latents), and the byte offset in the file where the latents start: `labels` (int64) first,
    then `latents`, `latents_std`, `latents_flip`, `latents_flip_std` (those there are), each
    8-byte aligned, in `latents.dtype`. A value beyond float16's range is refused, naming the
    latent's source: never stored as an infinity."""
    arrays, dtypes = {}, {}
    if latents.labels is not None:
        arrays["labels"] = latents.labels.detach().to("cpu", torch.int64).numpy().astype("<i8")
    for name in latents.stored():
        arrays[name], dtypes[name] = _stored_array(latents, name)
    values = arrays["latents"]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "aecli_version": aecli.__version__,
        "fingerprint": latents.fingerprint or "",
        "latent_shape": json.dumps(list(values.shape[1:])),
        "sources": json.dumps(latents.sources),
        "class_names": json.dumps(latents.class_names),
    }
    if latents.scaling is not None:
        metadata["scaling"] = json.dumps(latents.scaling.record())
    parts, offsets = tensor_file_parts(arrays, metadata, dtypes)
    return parts, offsets["latents"]


def _stored_array(latents: LatentFile, name: str) -> tuple[np.ndarray, str | None]:
    """A stored tensor as a C-ordered little-endian array in the file's dtype (no copy of
    float32 values), and its safetensors dtype where numpy has none (bfloat16: its bits)."""
    dtype = latents.dtype
    if dtype not in STORAGE:
        raise UsageError(f"--dtype {dtype}: choose {', '.join(STORAGE)}")
    values = latents.stored()[name].detach().to("cpu")
    if dtype == "float16":
        _check_float16_range(latents, name, values)
    values = values.to(STORAGE[dtype]).contiguous()
    if dtype == "bfloat16":
        return values.view(torch.int16).numpy().astype("<i2", copy=False), "BF16"
    return values.numpy().astype("<f4" if dtype == "float32" else "<f2", copy=False), None


def _check_float16_range(latents: LatentFile, name: str, values: torch.Tensor) -> None:
    peaks = values.float().abs().flatten(1).amax(1) if len(values) else values.new_zeros(0)
    beyond = torch.nonzero(peaks > FLOAT16_MAX).flatten()
    if len(beyond):
        row = int(beyond[0])
        source = latents.sources[row] if latents.sources else f"latent {row}"
        raise LatentFileError(
            f"{source}: its {name} reach {float(peaks[row]):.4g}, beyond float16's range "
            f"(+-{FLOAT16_MAX:g}); store them with --dtype bfloat16 or float32",
            path=latents.name or None,
        )


LATENT_SUFFIXES = (".safetensors", ".npy")


def names_folder(target: str) -> bool:
    """Whether an output name means a latent folder: any name but `-`, a name ending in
    .safetensors or .npy, and a device or FIFO to write into (`-o /dev/null`). An existing
    file of another name is then refused as a folder, never overwritten (`-o notes.md`)."""
    if target == STDIO or Path(target).suffix.lower() in LATENT_SUFFIXES:
        return False
    return not is_stream(target)


def output_format(target: str, fmt: str | None) -> str:
    """`npy` when asked or when the file ends in .npy; safetensors otherwise (also for `-`)."""
    if fmt is not None:
        if fmt not in ("safetensors", "npy"):
            raise UsageError(f"--format {fmt}: choose safetensors or npy")
        return fmt
    return "npy" if target != STDIO and Path(target).suffix.lower() == ".npy" else "safetensors"


def write_latents(target: str | Path, latents: LatentFile, fmt: str | None = None) -> None:
    """Write a latent file atomically, or to stdout (binary, nothing else) for `-`."""
    data = latent_bytes(latents, output_format(str(target), fmt))
    if str(target) == STDIO:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        atomic_write_bytes(target, data)


def read_latents(source: str | Path) -> LatentFile:
    """Read a latent file (safetensors or .npy, by content) from a path or `-` for stdin."""
    name = "stdin" if str(source) == STDIO else str(source)
    if str(source) == STDIO:
        if sys.stdin is None or sys.stdin.isatty():
            raise LatentFileError("no latent file on stdin (pipe one in, e.g. `aecli encode ...`)")
        data = sys.stdin.buffer.read()
    else:
        path = Path(source)
        if not path.exists():
            raise LatentFileError("file not found", path=name)
        if path.is_dir():
            raise LatentFileError("is a directory, not a latent file", path=name)
        if not path.is_file():  # a FIFO or a device would block or never end
            raise LatentFileError("not a regular file", path=name)
        data = path.read_bytes()
    if not data:
        raise LatentFileError("empty (no latent file)", path=name)
    if data.startswith(_NPY_MAGIC):
        return _from_npy(data, name)
    return _from_safetensors(data, name)


def is_latent_file(path: str | Path) -> bool:
    """Whether a regular file is a latent file: a .npy array, or safetensors whose metadata
    names aecli's latent format (its header read, not its tensors)."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as handle:
            start = handle.read(8)
            if start.startswith(_NPY_MAGIC[:6]):
                return True
            if len(start) < 8:
                return False
            length = int.from_bytes(start, "little")
            if length > 100_000_000:
                return False
            header = start + handle.read(length)
    except OSError:
        return False
    found = safetensors_header(header)
    metadata = found[0].get("__metadata__") if found else None
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT


def latent_file_facts(path: str | Path) -> dict:
    """What `aecli info FILE` says of a latent file."""
    latents = read_latents(path)
    return {
        "kind": "latent file",
        "count": len(latents),
        "latent_shape": list(latents.latents.shape[1:]),
        "stored": list(latents.stored()),
        "dtype": latents.dtype,
        "fingerprint": latents.fingerprint,
        "labels": latents.labels is not None,
        "class_names": latents.class_names,
        "scaling": None if latents.scaling is None else latents.scaling.record(),
        "scaling_described": None if latents.scaling is None else latents.scaling.describe(),
    }


def _from_npy(data: bytes, name: str) -> LatentFile:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise LatentFileError(f"not a plain numeric .npy array ({exc})", path=name) from None
    real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not real or array.ndim == 0:
        raise LatentFileError(
            f"a .npy latent file holds an array of real numbers (N, ...), found {array.dtype} "
            f"of shape {array.shape}",
            path=name,
        )
    checked = _checked(torch.from_numpy(array.astype(np.float32)), None, None, None, None, name)
    checked.dtype = "float16" if array.dtype == np.float16 else "float32"
    return checked


def _from_safetensors(data: bytes, name: str) -> LatentFile:
    metadata = _safetensors_metadata(data, name)
    if metadata.get("format") != FORMAT:
        weights = metadata.get("format") == "aecli-weights"
        hint = "; it is a weights file, give it as WEIGHTS" if weights else ""
        raise LatentFileError(
            f"not an aecli latent file (safetensors without aecli latent metadata{hint})",
            path=name,
        )
    try:
        tensors = load_safetensors(data)
        sources = json.loads(metadata.get("sources", "null"))
        class_names = json.loads(metadata.get("class_names", "null"))
        scaling = _scaling(metadata.get("scaling"))
    except Exception as exc:
        raise LatentFileError(f"damaged latent file ({first_line(exc)})", path=name) from None
    if "latents" not in tensors:
        raise LatentFileError("no `latents` tensor in the file", path=name)
    fingerprint = metadata.get("fingerprint") or None
    checked = _checked(
        tensors["latents"].float(), tensors.get("labels"), fingerprint, sources, class_names, name
    )
    checked.scaling = scaling
    checked.dtype = _storage_name(tensors["latents"].dtype)
    for field, stored in STORED.items():
        if field == "latents" or stored not in tensors:
            continue
        tensor = tensors[stored]
        if tensor.shape != tensors["latents"].shape or tensor.dtype != tensors["latents"].dtype:
            raise LatentFileError(
                f"its {stored} are {_typed(tensor)}, its latents {_typed(tensors['latents'])}: "
                "damaged",
                path=name,
            )
        tensor = tensor.float()
        if not torch.isfinite(tensor).all() or (field.endswith("std") and (tensor < 0).any()):
            what = "non-finite values" if field == "flip" else "negative or non-finite values"
            raise LatentFileError(f"its {stored} hold {what}", path=name)
        setattr(checked, field, tensor)
    return checked


def _storage_name(dtype: torch.dtype) -> str:
    return next((name for name, t in STORAGE.items() if t == dtype), str(dtype).split(".")[-1])


def _typed(tensor: torch.Tensor) -> str:
    return f"{_storage_name(tensor.dtype)} {tuple(tensor.shape)}"


def _scaling(text: str | None) -> LatentScaling | None:
    return None if text is None else LatentScaling.from_record(json.loads(text))


def _safetensors_metadata(data: bytes, name: str) -> dict:
    """The header's `__metadata__`, checked enough to say clearly what the bytes are not."""
    found = safetensors_header(data)
    if found is None:
        raise LatentFileError("not a latent file (neither safetensors nor .npy)", path=name)
    metadata = found[0].get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LatentFileError("damaged latent file (its metadata is not text)", path=name)
    return metadata


def _checked(latents, labels, fingerprint, sources, class_names, name) -> LatentFile:
    if latents.ndim < 1 or latents.shape[0] == 0:
        raise LatentFileError(f"holds no latents (shape {tuple(latents.shape)})", path=name)
    if not torch.isfinite(latents).all():
        raise LatentFileError("latents hold non-finite values (NaN or Inf)", path=name)
    if labels is not None and (labels.ndim != 1 or labels.shape[:1] != latents.shape[:1]):
        raise LatentFileError(
            f"labels of shape {tuple(labels.shape)} for {latents.shape[0]} latents", path=name
        )
    if not _names(sources) or len(sources) != latents.shape[0]:
        sources = None
    if not _names(class_names):
        class_names = None
    return LatentFile(latents, labels, fingerprint, sources, class_names, name)


def _names(value) -> bool:
    """Whether metadata holds a list of names (anything else is as if absent)."""
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


def fit_to_model(
    latents: LatentFile,
    latent_shape: tuple[int, ...],
    fingerprint: str,
    *,
    spatial: bool,
    force: bool = False,
    weights_name: str = "the weights",
) -> torch.Tensor:
    """The latents as (N, *latent_shape) for a model, after the model and shape checks.

    Latents written by another model are refused unless `force`; a fully convolutional model
    accepts any spatial size with the right channel count. A single latent without its batch
    dimension (a .npy of shape `latent_shape`) is taken as N = 1.
    """
    if latents.fingerprint and latents.fingerprint != fingerprint and not force:
        raise LatentFileError(
            f"latents come from model {latents.fingerprint}, not from {weights_name} "
            f"(model {fingerprint}); pass --force to decode them anyway",
            path=latents.name,
        )
    values = latents.latents
    if values.shape == torch.Size(latent_shape):
        values = values[None]
    found = tuple(values.shape[1:])
    fits = found == tuple(latent_shape) or (
        spatial and len(found) == 3 and found[0] == latent_shape[0]
    )
    if not fits:
        expected = f"(N, {', '.join(map(str, latent_shape))})"
        if spatial:
            expected = f"(N, {latent_shape[0]}, H, W)"
        raise LatentFileError(
            f"latent shape {tuple(values.shape)} does not fit the model: expected {expected}",
            path=latents.name,
        )
    return values

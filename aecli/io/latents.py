"""Latent files (DESIGN section 5): safetensors with `latents`, optional `labels` and metadata
naming the model; `.npy` for numpy tools; `-` for stdin / stdout so that commands chain.
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


@dataclass(frozen=True)
class LatentScaling:
    """Latents as diffusion models consume them: (z - shift) * scale (Stable Diffusion's
    scaling factor; SD3 and FLUX also shift)."""

    scale: float
    shift: float = 0.0

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def undo(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift


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

    def __len__(self) -> int:
        return self.latents.shape[0]


def latent_bytes(latents: LatentFile, fmt: str = "safetensors") -> bytes:
    """Serialise to the safetensors latent format, or to a plain .npy array (latents only)."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, _latent_array(latents), allow_pickle=False)
        return buffer.getvalue()
    return b"".join(latent_parts(latents)[0])


def latent_parts(latents: LatentFile) -> tuple[list[bytes | memoryview], int]:
    """The safetensors latent file as parts to write one after another (no copy of the
    latents), and the byte offset in the file where the float32 latents start: `labels`
    (int64) first, then `latents`, each 8-byte aligned."""
    values = _latent_array(latents)
    arrays = {}
    if latents.labels is not None:
        arrays["labels"] = latents.labels.detach().to("cpu", torch.int64).numpy().astype("<i8")
    arrays["latents"] = values
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
        scaling = latents.scaling
        metadata["scaling"] = json.dumps({"scale": scaling.scale, "shift": scaling.shift})
    parts, offsets = tensor_file_parts(arrays, metadata)
    return parts, offsets["latents"]


def _latent_array(latents: LatentFile) -> np.ndarray:
    """The latents as a C-ordered little-endian float32 array (no copy where they are one)."""
    values = latents.latents.detach().to("cpu", torch.float32).contiguous().numpy()
    return values.astype("<f4", copy=False)


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
    return _checked(torch.from_numpy(array.astype(np.float32)), None, None, None, None, name)


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
    return checked


def _scaling(text: str | None) -> LatentScaling | None:
    if text is None:
        return None
    raw = json.loads(text)
    scale, shift = float(raw["scale"]), float(raw["shift"])
    if not (math.isfinite(scale) and math.isfinite(shift) and scale > 0):
        raise ValueError(f"scaling {raw} is not a positive finite scale and a finite shift")
    return LatentScaling(scale, shift)


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

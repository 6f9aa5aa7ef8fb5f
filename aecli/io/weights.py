"""Self-describing weights files: tensors + the config and facts to use them.

Loading rebuilds the model from the file's metadata alone and never runs code from the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import aecli
from aecli.config import Config, config_from_dict
from aecli.errors import ConfigError, WeightsError, first_and_more, first_line, os_reason
from aecli.io import vae_families, vae_files, vae_tiny
from aecli.io.atomic import atomic_write_bytes
from aecli.io.tensorfile import safetensors_header, tensor_file_bytes
from aecli.models import Autoencoder, build_model

FORMAT = "aecli-weights"
FORMAT_VERSION = "1"
STATS_PREFIX = "latent_stats."


@dataclass
class WeightsInfo:
    """What a weights file says about itself, besides the tensors."""

    config: Config
    preset: str
    aecli_version: str
    fingerprint: str
    data: dict
    class_names: list[str] | None
    metrics: dict
    latent_stats: dict[str, torch.Tensor] | None = None


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (integers always): one sum, which is finite
    whenever every value is, and an element-wise check only where it is not (a NaN, an Inf, or
    finite values whose sum overflows), instead of a boolean tensor the size of every weight."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of the weights: each tensor's name, shape, dtype and the SHA-256 of its
    bytes, in name order. The tensors are hashed on every core at once (hashlib lets go of the
    GIL), so that a 2.7 GB VAE costs its bytes over the cores, not over one; the figure does not
    depend on the number of threads."""

    def digest(name: str) -> bytes:
        tensor = tensors[name].detach().to("cpu").contiguous()
        return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).digest()

    names = sorted(tensors)
    threads = max(1, min(os.cpu_count() or 1, 8, len(names)))
    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(digest, names))
    whole = hashlib.sha256()
    for name, part in zip(names, digests, strict=True):
        tensor = tensors[name]
        whole.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode() + part)
    return whole.hexdigest()[:16]


def save_weights(
    path: str | Path,
    model: Autoencoder,
    config: Config,
    *,
    preset: str,
    data: dict,
    class_names: list[str] | None,
    metrics: dict,
    latent_stats: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write model.safetensors atomically; returns the weights' fingerprint.

    Raises ValueError, writing nothing, if any tensor holds a NaN or an infinity.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    stats = {
        f"{STATS_PREFIX}{k}": v.detach().to("cpu").contiguous()
        for k, v in (latent_stats or {}).items()
    }
    for name, tensor in {**tensors, **stats}.items():
        if not all_finite(tensor):
            raise ValueError(f"tensor {name} holds non-finite values")
    print_ = fingerprint(tensors)
    tensors.update(stats)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "aecli_version": aecli.__version__,
        "preset": preset,
        "fingerprint": print_,
        "config": json.dumps(config.model_dump(mode="json")),
        "data": json.dumps(data),
        "class_names": json.dumps(class_names),
        "metrics": json.dumps(metrics),
    }
    atomic_write_bytes(path, tensor_file_bytes(tensors, metadata))
    return print_


def read_weights_info(path: str | Path) -> WeightsInfo:
    """Read a weights file's metadata, after checking that its tensors are sound and fit the
    stored architecture."""
    return read_weights(path)[0]


def load_weights(path: str | Path) -> tuple[Autoencoder, WeightsInfo]:
    """Rebuild the model a weights file describes and load its tensors; eval mode, on the CPU
    (the tensors as read: a safetensors file's are mapped, not copied)."""
    info, tensors = _open(path)
    # built on the meta device and given the file's tensors: no memory for random weights
    model = build_model(info.config, meta=True)
    weights = {k: v for k, v in tensors.items() if not k.startswith(STATS_PREFIX)}
    model.load_state_dict(weights, assign=True)
    return model.eval(), info


@dataclass
class InitWeights:
    """Tensors to start a run from (`aecli train --init`), checked against its model."""

    tensors: dict[str, torch.Tensor]

    def describe(self) -> str:
        """`all 124 tensors (encoder 52, latent head 2, decoder 70; 658,375 values)`"""
        parameters = sum(t.numel() for t in self.tensors.values())
        parts = Counter(name.split(".")[0].replace("_", " ") for name in self.tensors)
        listing = ", ".join(f"{part} {count}" for part, count in parts.items())
        return f"all {len(self.tensors)} tensors ({listing}; {parameters:,} values)"


def read_weights(path: str | Path) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """Any weights aecli reads (its own, a diffusers folder, a single-file VAE), checked, as
    what they say about themselves and their tensors under aecli's names (CPU)."""
    return _open(path)


def architecture_mismatch(config: Config, tensors: dict[str, torch.Tensor]) -> str | None:
    """The first way `tensors` do not fit the model `config` builds (a name, a shape), in words
    (`this model has X, the weights do not`), or None where every tensor fits."""
    expected = {k: tuple(v.shape) for k, v in build_model(config, meta=True).state_dict().items()}
    for name, shape in expected.items():
        if name not in tensors:
            return f"this model has {name}, the weights do not"
        if tuple(tensors[name].shape) != shape:
            return f"{name} is {list(tensors[name].shape)} in the weights, {list(shape)} here"
    extra = next((k for k in tensors if k not in expected), None)
    if extra is not None:
        return f"the weights have {extra}, this model does not"
    return None


def init_weights(path: str | Path, tensors: dict[str, torch.Tensor], config: Config) -> InitWeights:
    """The tensors (from `read_weights(path)`) to start the model `config` builds from: the
    architecture must match, every tensor by name and shape; one line names the first that
    does not."""
    tensors = {k: v for k, v in tensors.items() if not k.startswith(STATS_PREFIX)}
    problem = architecture_mismatch(config, tensors)
    if problem is not None:
        raise WeightsError(
            f"--init: another architecture than this preset's ({problem})", path=path
        )
    return InitWeights(tensors)


# A model's parameters at most (16 GB in float32): a stored config may not ask for more memory.
MAX_PARAMETERS = 2**32
# safetensors' own limit on the JSON header.
MAX_HEADER = 100_000_000
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}  # fmt: skip


def _open(path: str | Path) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """Validate a weights file from its header (format, version, the stored config, every
    tensor's name, shape and extent) and only then read its tensors: a doctored file is refused
    before it can make aecli allocate anything."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise WeightsError(
                "a symbolic link that leads nowhere (a loop, or its target is gone)", path=path
            )
        raise WeightsError("file not found", path=path)
    if path.is_dir():
        diffusers = any(
            (folder / vae_files.DIFFUSERS_CONFIG).is_file() for folder in (path, path / "vae")
        )
        if diffusers or not (path / "model.safetensors").is_file():
            return _open_diffusers_folder(path)
        path = path / "model.safetensors"  # a run directory: its weights
    if path.suffix.lower() in vae_tiny.TORCH_SUFFIXES:
        return _open_taesd_torch_files(path)
    if path.suffix.lower() in vae_files.PICKLE_SUFFIXES:
        raise WeightsError(
            f"a {path.suffix} file is a Python pickle, which can run code when loaded; aecli "
            "reads only .safetensors weights (look for the .safetensors release of this model)",
            path=path,
        )
    header, data_bytes = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError("damaged safetensors header (its metadata is not text)", path=path)
    if metadata.get("format") != FORMAT:
        return _open_single_file(path, header, data_bytes)
    version = metadata.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"weights format version {version!r}; this aecli ({aecli.__version__}) reads version "
            f"{FORMAT_VERSION} (a newer aecli wrote it?)",
            path=path,
        )
    info = _info(path, metadata)
    try:
        meta_model = build_model(info.config, meta=True)
    except ConfigError as exc:
        raise WeightsError(f"its stored model cannot be built: {exc}", path=path) from None
    _parameters_within_limit(path, meta_model)
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    expected.update(_stats_shapes(meta_model.latent_shape[0], info.class_names))
    _check_entries(path, header, data_bytes, expected)
    tensors = _read_tensors(path, list(header))
    stats = {k[len(STATS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATS_PREFIX)}
    info.latent_stats = stats or None
    return info, tensors


def _parameters_within_limit(path: Path, model: Autoencoder) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise WeightsError(
            f"its stored config asks for {parameters:,} parameters, more than aecli loads "
            f"({MAX_PARAMETERS:,})",
            path=path,
        )


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checked file; each must be finite."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"damaged safetensors file ({first_line(exc)})", path=path) from None
    for name, tensor in tensors.items():
        if not all_finite(tensor):
            raise WeightsError(f"tensor {name} holds non-finite values (NaN or Inf)", path=path)
    return tensors


def _open_diffusers_folder(folder: Path) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """A diffusers VAE folder of a family aecli reads (config.json +
    diffusion_pytorch_model[.fp16].safetensors), or a pipeline folder holding one as vae/."""
    vae = folder if (folder / vae_files.DIFFUSERS_CONFIG).is_file() else folder / "vae"
    config_path = vae / vae_files.DIFFUSERS_CONFIG
    if not config_path.is_file():
        raise WeightsError(
            "is a folder, but neither a run directory (no model.safetensors) nor a diffusers "
            "VAE folder (no config.json, no vae/config.json)",
            path=folder,
        )
    raw = vae_files.read_json(config_path)
    layout = vae_families.layout_from_diffusers_config(raw, config_path)
    weights = next((vae / n for n in vae_files.DIFFUSERS_WEIGHTS if (vae / n).is_file()), None)
    if weights is None:
        pickled = sorted(p.name for p in vae.glob("*.bin"))
        why = (
            f"only {pickled[0]}, a Python pickle, which aecli never loads"
            if pickled
            else f"no {vae_files.DIFFUSERS_WEIGHTS[0]}"
        )
        raise WeightsError(f"a diffusers VAE folder with {why}", path=vae)
    header, data_bytes = _read_header(weights)
    header.pop("__metadata__", None)
    shapes = {k: _entry_shape(weights, k, v, data_bytes) for k, v in header.items()}
    return _import_vae(weights, header, shapes, layout, "diffusers", "")


def _open_single_file(
    path: Path, header: dict, data_bytes: int
) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """A safetensors VAE without aecli metadata: latent-diffusion or diffusers key names, on
    their own or under first_stage_model. in a full Stable Diffusion checkpoint."""
    half = vae_tiny.taesd_half(header)
    if half is not None:
        return _open_taesd_files(path, header, data_bytes, half)
    shapes = {k: _entry_shape(path, k, v, data_bytes) for k, v in header.items()}
    layout = vae_families.layout_of_original(shapes, path)
    if layout is not None:
        return _import_vae(path, header, shapes, layout, "ldm", "")
    prefix = ""
    if vae_files.naming_of(header) is None and any(
        k.startswith(vae_files.FULL_CHECKPOINT_PREFIX) for k in header
    ):
        prefix = vae_files.FULL_CHECKPOINT_PREFIX
        header = {k[len(prefix) :]: v for k, v in header.items() if k.startswith(prefix)}
    naming = vae_files.naming_of(header)
    if naming is None:
        raise WeightsError(
            "a safetensors file, but neither aecli weights (no aecli metadata) nor a VAE "
            "(no encoder.conv_in.weight)",
            path=path,
        )
    if naming == "ldm":
        header = {
            k: v for k, v in header.items() if not k.startswith(vae_files.IGNORED_LDM_PREFIXES)
        }
    shapes = {k: _entry_shape(path, k, v, data_bytes) for k, v in header.items()}
    layout = vae_files.layout_from_shapes(shapes, naming, path)
    return _import_vae(path, header, shapes, layout, naming, prefix)


def _taesd_partner(path: Path, half: str) -> tuple[str, Path]:
    """(the other half, its file) of one of TAESD's files: beside it under the same name."""
    other_half = vae_tiny.HALVES[1 - vae_tiny.HALVES.index(half)]
    other = vae_tiny.partner(path, half)
    if other == path or not other.is_file():
        raise WeightsError(
            f"a TAESD {half} file; aecli reads it with its {other_half}, which should be "
            f"beside it as {other.name if other != path else f'a {other_half} file'}",
            path=path,
        )
    return other_half, other


def _open_taesd_files(
    path: Path, header: dict, data_bytes: int, half: str
) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """TAESD's own encoder and decoder files (taesd_encoder.safetensors and
    taesd_decoder.safetensors, or taesdxl_, taesd3_, taef1_...): either one, with the other
    beside it under the same name."""
    other_half, other = _taesd_partner(path, half)
    other_header, other_bytes = _read_header(other)
    other_header.pop("__metadata__", None)
    if vae_tiny.taesd_half(other_header) != other_half:
        raise WeightsError(f"not a TAESD {other_half} file (for {path.name})", path=other)
    files = {half: (path, header, data_bytes), other_half: (other, other_header, other_bytes)}
    combined = {
        f"{role}.{k}": v for role, (_, entries, _) in files.items() for k, v in entries.items()
    }
    shapes = {
        f"{role}.{k}": _entry_shape(file, k, v, size)
        for role, (file, entries, size) in files.items()
        for k, v in entries.items()
    }
    layout = vae_tiny.layout_from_taesd(shapes, path)
    sources = {role: file for role, (file, _, _) in files.items()}
    return _import_vae(path, combined, shapes, layout, "taesd", "", sources)


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32"}  # fmt: skip


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save file, through torch.load(weights_only=True): its restricted
    unpickler builds tensors and plain containers only and runs no code from the file; the
    storages are mapped, not read, until used."""
    if not path.is_file():
        raise WeightsError("file not found", path=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the unpickler's refusals and a damaged zip alike
        raise WeightsError(
            f"not a weights-only torch file ({first_line(exc)[:160]}); aecli reads .pth files "
            "through torch.load(weights_only=True) only",
            path=path,
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError("a torch file that is not a dictionary of named tensors", path=path)
    return state


def _open_taesd_torch_files(path: Path) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """TAESD's own .pth files (taesd_encoder.pth and taesd_decoder.pth, as released), read
    with torch.load(weights_only=True); other .pth files are refused."""
    state = _load_torch_file(path)
    half = vae_tiny.taesd_half(state)
    if half is None:
        raise WeightsError(
            "a .pth file that is not one of TAESD's encoder or decoder files; aecli reads other "
            "weights as .safetensors only (look for the .safetensors release of this model)",
            path=path,
        )
    other_half, other = _taesd_partner(path, half)
    other_state = _load_torch_file(other)
    if vae_tiny.taesd_half(other_state) != other_half:
        raise WeightsError(f"not a TAESD {other_half} file (for {path.name})", path=other)
    combined = {
        f"{role}.{k}": t
        for role, tensors in ((half, state), (other_half, other_state))
        for k, t in tensors.items()
    }
    header = {k: {"dtype": _DTYPE_NAMES.get(t.dtype, str(t.dtype))} for k, t in combined.items()}
    shapes = {k: tuple(t.shape) for k, t in combined.items()}
    layout = vae_tiny.layout_from_taesd(shapes, path)
    return _import_vae(path, header, shapes, layout, "taesd", "", loaded=combined)


def _import_vae(
    path: Path,
    header: dict,
    shapes: dict[str, tuple[int, ...]],
    layout: vae_families.Layout,
    naming: str,
    prefix: str,
    sources: dict[str, Path] | None = None,
    loaded: dict[str, torch.Tensor] | None = None,
) -> tuple[WeightsInfo, dict[str, torch.Tensor]]:
    """Check a VAE file's every tensor (header entries and their checked `shapes`, keys
    without `prefix`) against its layout, then read it under aecli's names. `sources`: the
    files that hold the keys after each `role.` (TAESD's encoder and decoder files)."""
    try:
        config = layout.config()
        meta_model = build_model(config, meta=True)
    except ConfigError as exc:
        raise WeightsError(f"its layout cannot be built in aecli: {exc}", path=path) from None
    _parameters_within_limit(path, meta_model)
    state = meta_model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    wanted = vae_files.check_shapes(layout, naming, shapes, expected, path)
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        # weights and statistics as floats; a counter (num_batches_tracked) as an integer
        counter = name in wanted and not state[wanted[name].aecli].is_floating_point()
        allowed = ("I64", "I32") if counter else ("F32", "F16", "BF16")
        if dtype not in allowed:
            what = "VAE weights stored as F32, F16 or BF16"
            what = f"{layout.family} counters as I64 or I32" if counter else what
            raise WeightsError(f"tensor {name} is {str(dtype)[:20]}; aecli reads {what}", path=path)
    if loaded is not None:
        found = {k: loaded[k] for k in wanted}
        for name, tensor in found.items():
            if not all_finite(tensor):
                raise WeightsError(f"tensor {name} holds non-finite values (NaN or Inf)", path=path)
    elif sources is None:
        raw = _read_tensors(path, [prefix + k for k in wanted])
        found = {k: raw[prefix + k] for k in wanted}
    else:
        found = {}
        for role, file in sources.items():
            keys = [k.split(".", 1)[1] for k in wanted if k.startswith(f"{role}.")]
            found.update({f"{role}.{k}": t for k, t in _read_tensors(file, keys).items()})
    tensors = vae_files.to_aecli(found, wanted, expected)
    folder = path.name in vae_files.DIFFUSERS_WEIGHTS
    kind = "diffusers" if folder else "single-file"
    # a family's own single-file names are its release's, not latent diffusion's
    original = naming == "ldm" and layout.family != "AutoencoderKL"
    source = "diffusers folder" if folder else "original keys" if original else f"{naming} keys"
    # what the file cannot tell, in one line (DC-AE's twin releases' scaling factors)
    source += f"; {layout.note}" if getattr(layout, "note", "") else ""
    info = WeightsInfo(
        config=config,
        preset=f"{layout.family} ({source})",
        aecli_version="",
        fingerprint=fingerprint(tensors),
        data={"kind": kind, "path": str(path)},
        class_names=None,
        metrics={},
    )
    return info, tensors


def _entry_shape(path: Path, name: str, entry, available: int) -> tuple[int, ...]:
    """A header entry's shape, after checking that its bytes lie within the file's data."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(shape)
        whole = [n for n in (*shape, begin, end) if isinstance(n, int) and not isinstance(n, bool)]
        if len(whole) != len(shape) + 2 or min(whole) < 0:
            raise ValueError("shape and offsets must be whole numbers")
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"damaged safetensors header entry for {name}", path=path) from None
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise WeightsError(
            f"tensor {name} is {str(dtype)[:20]}; aecli reads weights stored as "
            f"{', '.join(_DTYPE_BYTES)}",
            path=path,
        )
    itemsize = _DTYPE_BYTES[dtype]
    if not (0 <= begin <= end <= available) or end - begin != itemsize * math.prod(shape):
        raise WeightsError(
            f"damaged safetensors file: the data of tensor {name} lies outside the file "
            "(truncated?)",
            path=path,
        )
    return shape


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the number of data bytes after it, read without reading
    the tensors."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or length > min(size - 8, MAX_HEADER):
                raise WeightsError(
                    f"not a safetensors file ({_sniff(path)}); aecli loads only safetensors "
                    "weights (its own, or a Stable Diffusion-family VAE)",
                    path=path,
                )
            parsed = safetensors_header(head + handle.read(length))
    except OSError as exc:
        raise WeightsError(f"cannot read: {os_reason(exc)}", path=path) from None
    if parsed is None:
        raise WeightsError(
            f"not a safetensors file ({_sniff(path)}); aecli loads only safetensors "
            "weights (its own, or a Stable Diffusion-family VAE)",
            path=path,
        )
    header, length = parsed
    return header, size - 8 - length


def _check_entries(
    path: Path, stored: dict, available: int, expected: dict[str, tuple[int, ...]]
) -> None:
    """Every tensor the architecture needs, with its shape, and no other; each tensor's bytes
    within the `available` data bytes."""
    required = [k for k in expected if not k.startswith(STATS_PREFIX)]
    missing = [k for k in required if k not in stored]
    if missing:
        raise WeightsError(
            f"tensors do not match the stored architecture (missing {first_and_more(missing)})",
            path=path,
        )
    for name, entry in stored.items():
        if name not in expected:
            raise WeightsError(
                f"tensors do not match the stored architecture (unexpected tensor {name})",
                path=path,
            )
        shape = _entry_shape(path, name, entry, available)
        if shape != expected[name]:
            raise WeightsError(
                f"tensors do not match the stored architecture (wrong shape for {name}: "
                f"{list(shape)}, expected {list(expected[name])})",
                path=path,
            )


def _stats_shapes(dim: int, class_names: list[str] | None) -> dict[str, tuple[int, ...]]:
    """The shapes latent statistics may have (stats.py): over D latent dimensions, K classes."""
    k = len(class_names or [])
    shapes = {"count": (), "mean": (dim,), "cov": (dim, dim)}
    if k:
        shapes.update(class_count=(k,), class_mean=(k, dim), class_cov=(k, dim, dim))
    return {f"{STATS_PREFIX}{name}": shape for name, shape in shapes.items()}


def _info(path: Path, metadata: dict) -> WeightsInfo:
    try:
        raw_config = json.loads(metadata["config"])
        class_names = json.loads(metadata.get("class_names", "null"))
        if class_names is not None and not (
            isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)
        ):
            raise ValueError("class_names is not a list of names")
        data = json.loads(metadata.get("data", "{}"))
        metrics = json.loads(metadata.get("metrics", "{}"))
        if not isinstance(data, dict):
            raise ValueError("data is not a record")
        numbers = isinstance(metrics, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
        )
        if not numbers:
            raise ValueError("metrics are not named numbers")
        return WeightsInfo(
            config=config_from_dict(raw_config, str(path)),
            preset=metadata.get("preset", "?"),
            aecli_version=metadata.get("aecli_version", "?"),
            fingerprint=metadata.get("fingerprint", ""),
            data=data,
            class_names=class_names,
            metrics=metrics,
        )
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise WeightsError(f"damaged aecli metadata ({first_line(exc)[:200]})", path=path) from None
    except ConfigError as exc:
        raise WeightsError(
            f"its stored configuration is invalid: {exc.problems[0]}", path=path
        ) from None


def _sniff(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty"
    if head[:1] == b"\x80":
        return "it looks like a Python pickle, which aecli never loads"
    if head[:2] == b"PK":
        return "it looks like a zip / torch.save checkpoint, which aecli never loads"
    return "unrecognised header"

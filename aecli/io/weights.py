"""Self-describing weights files (DESIGN section 6): tensors + the config and facts to use them.

Loading rebuilds the model from the file's metadata alone and never runs code from the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import aecli
from aecli.config import Config, config_from_dict
from aecli.errors import ConfigError, WeightsError
from aecli.io.atomic import atomic_write_bytes
from aecli.io.tensorfile import tensor_file_bytes
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


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of the weights: names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


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
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
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
    """Read a weights file's metadata, after checking that its tensors are sound."""
    return _open(path, with_tensors=True)[0]


def load_weights(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Autoencoder, WeightsInfo]:
    """Rebuild the model a weights file describes and load its tensors; eval mode."""
    info, tensors = _open(path, with_tensors=True)
    try:
        model = build_model(info.config)
    except ConfigError as exc:
        raise WeightsError(f"its stored model cannot be built: {exc}", path=path) from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or shapes:
        what = f"missing {missing[0]}" if missing else f"wrong shape for {shapes[0]}"
        raise WeightsError(f"tensors do not match the stored architecture ({what})", path=path)
    model.load_state_dict({k: tensors[k] for k in expected})
    return model.to(device).eval(), info


def _open(path: str | Path, with_tensors: bool = False):
    path = Path(path)
    if not path.exists():
        raise WeightsError("file not found", path=path)
    if path.is_dir():
        raise WeightsError(
            "is a directory; give the model.safetensors file inside a run", path=path
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise WeightsError(
                    "a safetensors file, but not aecli weights (no aecli metadata)", path=path
                )
            tensors = {k: handle.get_tensor(k) for k in handle.keys()} if with_tensors else {}  # noqa: SIM118
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise WeightsError(
            f"not a safetensors file ({_sniff(path)}); aecli loads only "
            "safetensors weights written by `aecli train`",
            path=path,
        ) from None
    try:
        raw_config = json.loads(metadata["config"])
        info = WeightsInfo(
            config=config_from_dict(raw_config, str(path)),
            preset=metadata.get("preset", "?"),
            aecli_version=metadata.get("aecli_version", "?"),
            fingerprint=metadata.get("fingerprint", ""),
            data=json.loads(metadata.get("data", "{}")),
            class_names=json.loads(metadata.get("class_names", "null")),
            metrics=json.loads(metadata.get("metrics", "{}")),
        )
    except (KeyError, json.JSONDecodeError) as exc:
        raise WeightsError(f"damaged aecli metadata ({exc})", path=path) from None
    except ConfigError as exc:
        raise WeightsError(
            f"its stored configuration is invalid: {exc.problems[0]}", path=path
        ) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"tensor {name} holds non-finite values (NaN or Inf)", path=path)
    stats = {k[len(STATS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATS_PREFIX)}
    info.latent_stats = stats or None
    return info, tensors


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

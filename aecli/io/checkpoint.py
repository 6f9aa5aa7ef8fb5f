"""Checkpoint files: every tensor of a training state in safetensors, the rest as JSON metadata.

Nested state (optimiser state dicts, the engine's counters) is flattened: each tensor is stored
under a dotted key and replaced in the JSON skeleton by {"__tensor__": key}. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from aecli.errors import UsageError
from aecli.io.atomic import atomic_write_bytes
from aecli.io.jsonfile import regular_file
from aecli.io.tensorfile import tensor_file_bytes

FORMAT = "aecli-checkpoint"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, list | tuple):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write a nested training state atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    metadata = {"format": FORMAT, "state": json.dumps(skeleton)}
    atomic_write_bytes(path, tensor_file_bytes(tensors, metadata))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by save_checkpoint."""
    path = Path(path)
    try:
        present = regular_file(path)  # a FIFO would block safetensors' open
    except ValueError as exc:
        raise UsageError(str(exc), path=path) from None
    if not present:
        raise UsageError("no checkpoint here: nothing to resume", path=path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise UsageError("not an aecli checkpoint", path=path)
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        return _unflatten(json.loads(metadata["state"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise UsageError(f"damaged checkpoint ({type(exc).__name__})", path=path) from None


def read_train_state(path: str | Path) -> dict | None:
    """A checkpoint's train_state (epoch, step, finished, ...) from its header alone; None where
    there is no readable aecli checkpoint."""
    try:
        if not regular_file(Path(path)):  # a FIFO would block safetensors' open
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            return None
        pairs = json.loads(metadata["state"])["__dict__"]  # the skeleton _flatten wrote
        found = next(value for key, value in pairs if key == "train_state")
        state = _unflatten(found, {})  # plain values: no tensor is read
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    return state if isinstance(state, dict) else None

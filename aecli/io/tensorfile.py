"""The safetensors layout at the byte level: an 8-byte little-endian header length, a JSON
header (tensor entries and `__metadata__`), then the tensor data.

safetensors writes its metadata in hash-map order, which changes from call to call; `--seed`
promises byte-identical files, so aecli rewrites the header in a fixed order.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
from safetensors.torch import save


def safetensors_header(data: bytes) -> tuple[dict, int] | None:
    """(the JSON header, its length in bytes), or None if `data` is not laid out as safetensors."""
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8 or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return (header, length) if isinstance(header, dict) else None


def tensor_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """`safetensors.torch.save` with the metadata keys in sorted order."""
    data = save(tensors, metadata=metadata)
    header, length = safetensors_header(data)
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}


def tensor_file_parts(
    arrays: dict[str, np.ndarray],
    metadata: dict[str, str],
    dtypes: dict[str, str] | None = None,
) -> tuple[list[bytes | memoryview], dict[str, int]]:
    """A safetensors file of little-endian float32 / float16 / int64 arrays, as parts to write
    one after another: the header, then each array's own memory in the given order (no copy of
    the data). `dtypes` names an array's safetensors dtype where numpy has none (`BF16`: its
    bits as `<i2`). Also returns where each array's data starts in the file, for readers that
    map it (`numpy.memmap(path, "<f4", "r", offset, shape)`)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    ends, offset = {}, 0
    for name, array in arrays.items():
        header[name] = {
            "dtype": (dtypes or {}).get(name) or _DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        ends[name] = offset
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned
    start = 8 + len(text)
    views = [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays.values()]
    return [struct.pack("<Q", len(text)) + text, *views], {k: start + v for k, v in ends.items()}

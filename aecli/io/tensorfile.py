"""Safetensors bytes that are the same for the same tensors and metadata, every time.

safetensors writes its metadata in hash-map order, which changes from call to call; `--seed`
promises byte-identical files, so the header is rewritten in a fixed order.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save


def tensor_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """`safetensors.torch.save` with the metadata keys in sorted order."""
    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data[8 + length :]

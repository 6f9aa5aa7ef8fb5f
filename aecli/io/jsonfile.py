"""JSON files anyone may have written (an index, a diffusers config.json): read within a size
limit, never from a FIFO or a device, every failure one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aecli.errors import first_line, os_reason


def read_json_file(path: Path, limit: int) -> Any:
    """The JSON value in `path`; ValueError with the one-line reason where it cannot be had:
    not a regular file (a FIFO would block), unreadable, over `limit` bytes, or damaged (bad
    bytes, bad JSON, nesting too deep for Python)."""
    if not path.is_file():
        raise ValueError("not a regular file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read: {os_reason(exc)}") from None
    if len(data) > limit:
        raise ValueError(f"larger than {limit:,} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"damaged: {first_line(exc)[:200]}") from None

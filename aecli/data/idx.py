"""MNIST-format IDX files (plain or gzip): images (idx3) and labels (idx1)."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np

from aecli.errors import DataError

_IMAGES = re.compile(r"images[-.]idx3[-.]ubyte(\.gz)?$")
_LABELS = re.compile(r"labels[-.]idx1[-.]ubyte(\.gz)?$")


def is_idx(path: Path) -> bool:
    return bool(re.search(r"idx[0-9][-.]ubyte(\.gz)?$", path.name))


def read_idx(path: Path) -> np.ndarray:
    """One IDX file as an array; a bad magic number or size is a one-line DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file: {exc}", path=path) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(
            f"bad magic number {data[:4].hex() or 'none'}: not an unsigned-byte IDX "
            "file (expected 0000080N)",
            path=path,
        )
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataError(f"bad IDX header (dimensions {ndim})", path=path)
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if body.size != int(np.prod(shape)):
        raise DataError(
            f"IDX header says {shape} but the file holds {body.size} values (truncated?)", path=path
        )
    return body.reshape(shape)


def read_idx_pair(images_path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An idx3 images file and, when it lies beside it, its idx1 labels file."""
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(
            f"expected N x H x W images (idx3), got {images.ndim} dimensions", path=images_path
        )
    stem = _IMAGES.sub("", images_path.name)
    candidates = sorted(
        p
        for p in images_path.parent.iterdir()
        if _LABELS.search(p.name) and _LABELS.sub("", p.name) == stem
    )
    if not candidates:
        return images, None
    labels = read_idx(candidates[0])
    if labels.shape != (len(images),):
        raise DataError(f"{len(labels)} labels for {len(images)} images", path=candidates[0])
    return images, labels.astype(np.int64)


def find_idx_splits(folder: Path) -> tuple[Path, Path | None] | None:
    """(train images, test images or None) in a folder of IDX files; None if there are none."""
    images = sorted(p for p in folder.iterdir() if _IMAGES.search(p.name))
    if not images:
        bad = sorted(p for p in folder.iterdir() if is_idx(p))
        if bad:  # IDX files, but no images file: read one so that its problem is reported
            read_idx(bad[0])
        return None
    train = [p for p in images if p.name.startswith("train")]
    test = [p for p in images if p.name.startswith(("t10k", "test"))]
    if train:
        return train[0], test[0] if test else None
    return images[0], None

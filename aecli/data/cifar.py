"""CIFAR-10 / CIFAR-100 batch folders: the python version (restricted unpickler) and binary.

The python batches are pickles. They are read with an unpickler that admits only plain
containers, bytes, numbers, strings and numpy arrays: a pickle that asks for anything else (the
way malicious pickles run code) is refused before it can do anything.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from aecli.errors import DataError

# (module, name) pairs a CIFAR pickle may use: numpy array and dtype reconstruction, and the
# bytes encoding that Python 3 writes into protocol-2 pickles.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def load_restricted_pickle(path: Path):
    try:
        with path.open("rb") as handle:
            return _RestrictedUnpickler(handle, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"refused to load: the pickle asks for code ({exc}), not only plain "
            "containers and arrays",
            path=path,
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(
            f"not a readable CIFAR batch ({type(exc).__name__}: {exc})", path=path
        ) from None


def _get(batch: dict, key: str, path: Path):
    for candidate in (key.encode(), key):
        if isinstance(batch, dict) and candidate in batch:
            return batch[candidate]
    raise DataError(f"not a CIFAR batch: no '{key}' entry", path=path)


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _python_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_restricted_pickle(path)
    data = np.asarray(_get(batch, "data", path))
    labels = np.asarray(_get(batch, label_key, path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"expected uint8 N x 3072 data, got {data.dtype} {data.shape}", path=path)
    if len(labels) != len(data):
        raise DataError(f"{len(labels)} labels for {len(data)} images", path=path)
    return data.reshape(-1, 3, 32, 32), labels


def _binary_batch(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3072
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"size {raw.size} is not a whole number of {record}-byte CIFAR records", path=path
        )
    rows = raw.reshape(-1, record)
    # CIFAR-100 records hold (coarse, fine) labels: the fine one is last
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, label_bytes - 1].astype(np.int64)


def detect_cifar(folder: Path) -> str | None:
    """Which CIFAR layout a folder holds: 'py10', 'py100', 'bin10', 'bin100' or None."""
    names = {p.name for p in folder.iterdir()}
    if "batches.meta" in names and any(n.startswith("data_batch_") for n in names):
        return "py10"
    if "meta" in names and "train" in names:
        return "py100"
    if any(n.startswith("data_batch_") and n.endswith(".bin") for n in names):
        return "bin10"
    if "train.bin" in names:
        return "bin100"
    return None


def read_cifar(folder: Path, layout: str):
    """(train images, train labels, test images or None, test labels or None, class names)."""
    if layout == "py10":
        meta = load_restricted_pickle(folder / "batches.meta")
        names = _names(_get(meta, "label_names", folder / "batches.meta"))
        parts = [_python_batch(p, "labels") for p in sorted(folder.glob("data_batch_*"))]
        test = folder / "test_batch"
        test_part = _python_batch(test, "labels") if test.exists() else None
    elif layout == "py100":
        meta = load_restricted_pickle(folder / "meta")
        names = _names(_get(meta, "fine_label_names", folder / "meta"))
        parts = [_python_batch(folder / "train", "fine_labels")]
        test = folder / "test"
        test_part = _python_batch(test, "fine_labels") if test.exists() else None
    elif layout == "bin10":
        names = _text_names(folder / "batches.meta.txt")
        parts = [_binary_batch(p, 1) for p in sorted(folder.glob("data_batch_*.bin"))]
        test = folder / "test_batch.bin"
        test_part = _binary_batch(test, 1) if test.exists() else None
    else:
        names = _text_names(folder / "fine_label_names.txt")
        parts = [_binary_batch(folder / "train.bin", 2)]
        test = folder / "test.bin"
        test_part = _binary_batch(test, 2) if test.exists() else None
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    top = int(labels.max()) + 1
    if not names or len(names) < top:
        names = [str(i) for i in range(top)]
    test_images, test_labels = test_part if test_part else (None, None)
    return images, labels, test_images, test_labels, names


def _text_names(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]

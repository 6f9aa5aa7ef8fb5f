"""Data sources, detected from the path: in memory as one uint8 (N, C, H, W) tensor + labels, or
streamed from disk (aecli.data.stream) where a folder is too large, and for WebDataset shards.
Either is TrainingData (aecli.data.dataset)."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aecli.config import DataConfig
from aecli.data.cifar import detect_cifar, read_cifar
from aecli.data.dataset import (
    FolderListing,
    ImageData,
    TrainingData,
    list_folder,
)
from aecli.data.idx import find_idx_splits, is_idx, read_idx_pair
from aecli.data.images import (
    BACKGROUND,
    Failure,
    ImageReadError,
    crop_box,
    decode_all,
    fit_picture,
    read_image,
)
from aecli.data.shapes import CLASS_NAMES, make_shapes
from aecli.data.shards import shard_paths
from aecli.data.stream import StreamedData, choose_validation, open_stream
from aecli.errors import DATA_LAYOUTS as LAYOUTS
from aecli.errors import DataError, missing_data
from aecli.io.jsonfile import file_kind


def load_data(
    path: str | Path | None,
    config: DataConfig,
    seed: int = 0,
    *,
    validation: str | Path | None = None,
) -> TrainingData:
    """Load the data a path names (or the built-in shapes when None), fitted to the preset:
    in memory, or streamed from disk (folders as data.stream decides, WebDataset shards
    always). `validation` (--val-data) is a separate validation set, held in memory."""
    held_out = None
    if validation is not None:
        if shard_paths(validation):
            raise DataError(
                "--val-data takes images held in memory: a folder, IDX, CIFAR or array file, "
                "not shards",
                path=validation,
            )
        held_out = load_data(validation, config.model_copy(update={"stream": False}), seed)
        held_out.source = {**held_out.source, "split": "validation"}
    data = _load(path, config, seed)
    if isinstance(data, StreamedData):
        return choose_validation(data, config.val_fraction, held_out)
    if held_out is not None:
        data.validation = held_out
    return data


def _load(path: str | Path | None, config: DataConfig, seed: int) -> TrainingData:
    if path is None:
        if config.stream is True:
            raise DataError("data.stream: the built-in shapes are made in memory")
        images, labels = make_shapes(config.builtin_count, config.size, config.channels, seed)
        source = {"kind": "builtin-shapes", "count": len(images), "seed": seed}
        return ImageData(torch.from_numpy(images), torch.from_numpy(labels), CLASS_NAMES, source)
    shards = shard_paths(path)
    if shards is not None:
        return open_stream(path, config, shards)
    path = Path(path)
    if not path.exists():
        raise missing_data(path)
    mode = path.stat().st_mode
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):  # a FIFO would block its reader
        raise DataError(f"not a regular file ({file_kind(mode)})", path=path)
    if path.is_dir():
        try:
            layout = detect_cifar(path)
            idx_files = None if layout else find_idx_splits(path)
        except PermissionError:
            raise DataError("permission denied", path=path) from None
        if layout or idx_files:
            _in_memory_only(config, path)
            return _load_cifar(path, layout, config) if layout else _load_idx(*idx_files, config)
        listing = list_folder(path)
        if _streams(config, len(listing.files)):
            return open_stream(path, config, None, listing)
        return _load_folder(listing, config)
    _in_memory_only(config, path)
    if is_idx(path):
        return _load_idx(path, None, config)
    if path.suffix.lower() in (".npy", ".npz"):
        return _load_array_file(path, config)
    raise DataError(f"not a data source aecli understands; --data takes {LAYOUTS}", path=path)


def _in_memory_only(config: DataConfig, path: Path) -> None:
    if config.stream is True or config.resize is not None or config.crop == "random":
        raise DataError(
            "data.stream, data.resize and data.crop: random read image folders and WebDataset "
            "shards; this source is read into memory whole",
            path=path,
        )


# A folder streams (data.stream: auto) where its decoded pixels would take more than this share
# of the memory available when the run starts.
STREAM_SHARE = 0.25


def _streams(config: DataConfig, count: int) -> bool:
    """Whether a folder of `count` images streams: as data.stream says, and for auto where
    data.resize or a random crop needs the full images every epoch, or the decoded set would
    take more than STREAM_SHARE of available memory."""
    if config.stream != "auto":
        return bool(config.stream)
    if config.resize is not None or config.crop == "random":
        return True
    from aecli.devices import available_memory

    available = available_memory(torch.device("cpu", 0))
    h, w = config.size
    return available is not None and count * config.channels * h * w > STREAM_SHARE * available


def _load_folder(listing: FolderListing, config: DataConfig) -> ImageData:
    root, paths, all_labels = listing.root, listing.files, listing.labels
    failures, class_names = list(listing.failures), listing.class_names

    def fit(image):
        return fit_picture(image, config.size, config.fit)

    def read(file: Path) -> np.ndarray | Failure:
        try:
            return read_image(file, config.channels, fit=fit)
        except ImageReadError as exc:
            return Failure(exc.path, exc.reason)

    results = decode_all(read, paths)
    keep = [i for i, r in enumerate(results) if not isinstance(r, Failure)]
    failures += [r for r in results if isinstance(r, Failure)]
    if not keep:
        raise DataError(
            f"none of the {len(paths)} images could be read "
            f"(first: {failures[0].path}: {failures[0].reason})",
            path=root,
        )
    images = torch.from_numpy(np.stack([results[i] for i in keep])).permute(0, 3, 1, 2)
    labels = None
    if all_labels is not None:
        labels = torch.tensor([all_labels[i] for i in keep], dtype=torch.int64)
    source = {"kind": "folder", "path": str(root), "count": len(keep), "streamed": False}
    return ImageData(images.contiguous(), labels, class_names, source, failures)


def _from_arrays(images, labels, class_names, source, config, val_images=None, val_labels=None):
    """uint8 N x C x H x W (or N x H x W) arrays to an ImageData fitted to the preset."""

    def part(array, label_array, description):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor[:, None] if tensor.ndim == 3 else tensor
        labels_t = None if label_array is None else torch.from_numpy(label_array.astype(np.int64))
        return ImageData(fit_tensor(tensor, config), labels_t, class_names, description)

    data = part(images, labels, source)
    if val_images is not None:
        data.validation = part(val_images, val_labels, {**source, "split": "test"})
    return data


def _load_idx(train: Path, test: Path | None, config: DataConfig) -> ImageData:
    images, labels = read_idx_pair(train)
    val_images, val_labels = read_idx_pair(test) if test else (None, None)
    names = _numbered_classes(labels)
    source = {"kind": "idx", "path": str(train.parent if test else train), "count": len(images)}
    return _from_arrays(images, labels, names, source, config, val_images, val_labels)


def _load_cifar(folder: Path, layout: str, config: DataConfig) -> ImageData:
    images, labels, val_images, val_labels, names = read_cifar(folder, layout)
    kind = "cifar-100" if layout.endswith("100") else "cifar-10"
    source = {"kind": kind, "path": str(folder), "count": len(images)}
    return _from_arrays(images, labels, names, source, config, val_images, val_labels)


def _load_array_file(path: Path, config: DataConfig) -> ImageData:
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                "holds Python objects (pickled); aecli only reads plain numeric arrays", path=path
            ) from None
        raise DataError(f"not a readable numpy file: {exc}", path=path) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"not a readable numpy file: {exc}", path=path) from None
    labels_array = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = set(loaded.files)
            image_key = next((k for k in ("images", "x", "X") if k in keys), None)
            if image_key is None:
                raise DataError(
                    f"no 'images' or 'x' array in the .npz (found: "
                    f"{', '.join(sorted(keys)) or 'nothing'})",
                    path=path,
                )
            label_key = next((k for k in ("labels", "y", "Y") if k in keys), None)
            try:
                array = loaded[image_key]
                labels_array = loaded[label_key] if label_key else None
            except ValueError as exc:
                raise DataError(f"array holds Python objects (pickled): {exc}", path=path) from None
    else:
        array = loaded
    images = _to_nchw_uint8(array, path)
    if labels_array is not None:
        labels_array = np.asarray(labels_array).reshape(-1)
        if len(labels_array) != len(images) or not np.issubdtype(labels_array.dtype, np.integer):
            raise DataError(
                f"labels must be {len(images)} integers, got shape "
                f"{labels_array.shape} of {labels_array.dtype}",
                path=path,
            )
    source = {"kind": "array", "path": str(path), "count": len(images)}
    return _from_arrays(
        images.numpy(), labels_array, _numbered_classes(labels_array), source, config
    )


def _numbered_classes(labels: np.ndarray | None) -> list[str] | None:
    """Class names '0', '1', ... for integer labels without names of their own."""
    if labels is None or not len(labels):
        return None
    return [str(i) for i in range(int(labels.max()) + 1)]


def _to_nchw_uint8(array: np.ndarray, path: Path) -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        if array.shape[1] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            pass  # N x C x H x W
        elif array.shape[-1] in (1, 3, 4):
            array = array.transpose(0, 3, 1, 2)
        else:
            raise DataError(
                f"cannot tell the channel axis of shape {array.shape}: expected "
                "N x H x W, N x H x W x C or N x C x H x W with C in 1, 3, 4",
                path=path,
            )
    else:
        raise DataError(
            f"expected N x H x W, N x H x W x C or N x C x H x W images, got shape {array.shape}",
            path=path,
        )
    if len(array) == 0:
        raise DataError("holds no images", path=path)
    if array.dtype == np.uint8:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise DataError("float images must be finite and in [0, 1]", path=path)
        tensor = torch.from_numpy(np.rint(array * 255).astype(np.uint8))
    else:
        raise DataError(f"images must be uint8 or float in [0, 1], got {array.dtype}", path=path)
    if tensor.shape[1] == 4:  # composite alpha on the reader's background
        rgb, alpha = tensor[:, :3].float(), tensor[:, 3:].float() / 255
        back = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
        tensor = (rgb * alpha + back * (1 - alpha)).round().to(torch.uint8)
    return tensor


def fit_tensor(images: torch.Tensor, config: DataConfig, chunk: int = 1024) -> torch.Tensor:
    """Convert uint8 (N, C, H, W) to the preset's channels and size, in chunks."""
    h, w = config.size
    c = images.shape[1]
    if c == config.channels and images.shape[-2:] == (h, w):
        return images.contiguous()
    out = torch.empty((len(images), config.channels, h, w), dtype=torch.uint8)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float()
        if config.channels == 1 and c == 3:
            x = (x * luma).sum(1, keepdim=True)
        elif config.channels == 3 and c == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (h, w):
            size, (top, left) = (h, w), (0, 0)
            if config.fit == "crop":
                size, (top, left) = crop_box(x.shape[-2:], (h, w))
            x = F.interpolate(
                x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < x.shape[-2]
            )
            x = x[..., top : top + h, left : left + w]
        out[start : start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out

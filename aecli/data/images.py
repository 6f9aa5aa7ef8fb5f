"""The one image reader and the recursive image-file listing.

Every command and the folder data source read images through `read_image`; a file that cannot
be used raises ImageReadError with a reason a person can act on, never anything else.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from aecli.errors import first_line

T, R = TypeVar("T"), TypeVar("R")

# Formats Pillow may open: no plugin outside this list ever parses a user's file.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Transparent pixels are composited on this fixed background (white).
BACKGROUND = (255, 255, 255)
# No file holding an image the reader accepts (at most Pillow's MAX_IMAGE_PIXELS, the
# decompression-bomb limit) is larger than this: 8 bytes a pixel (16-bit RGBA stored
# uncompressed) and 16 MiB of metadata. A tar member larger than this is never read.
MAX_IMAGE_BYTES = (Image.MAX_IMAGE_PIXELS or 89_478_485) * 8 + (16 << 20)


class ImageReadError(Exception):
    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str


def read_image(
    path: str | Path,
    channels: int = 3,
    *,
    at_least: int | None = None,
    fit: Callable[[Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """Decode one image file to uint8 (H, W, channels), safely; raises ImageReadError.

    `at_least` lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) as long as both sides
    stay at least that many pixels: much faster when the image is resized down anyway. `fit`
    resizes or crops the decoded picture (in the reader's channels) before it becomes an array.
    What the decoders say on the way (Pillow's warnings, libtiff's messages) is kept off the
    terminal; when the file cannot be read it joins the file's one-line reason.
    """
    said: list[str] = []
    try:
        return _decode(path, channels, at_least, fit, said)
    except ImageReadError as exc:
        raise ImageReadError(path, _with_notes(exc.reason, said)) from None


def read_image_bytes(
    data: bytes,
    name: str,
    channels: int = 3,
    *,
    at_least: int | None = None,
    fit: Callable[[Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """`read_image` for an image held in memory (a member of a tar shard), `name` saying where
    it came from in messages."""
    said: list[str] = []
    try:
        return _decode(name, channels, at_least, fit, said, io.BytesIO(data))
    except ImageReadError as exc:
        raise ImageReadError(name, _with_notes(exc.reason, said)) from None


def _decode(
    path: str | Path,
    channels: int,
    at_least: int | None,
    fit: Callable[[Image.Image], Image.Image] | None,
    said: list[str],
    data: io.BytesIO | None = None,
) -> np.ndarray:
    try:
        # a FIFO would block, a device never end
        if data is None and not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageReadError(path, "not a regular file")
        source = path if data is None else data
        with _warnings_to(said), Image.open(source, formats=ALLOWED_FORMATS) as image:
            # Pillow only warns between its two limits; a bomb is an error here at any size.
            if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise Image.DecompressionBombError(f"{image.width}x{image.height}")
            if at_least and image.format == "JPEG":
                image.draft(image.mode, (at_least, at_least))
            with _native_messages_to(said) if image.format == "TIFF" else nullcontext():
                image.load()  # opening is lazy: decoding errors surface here
            ImageOps.exif_transpose(image, in_place=True)  # the decoded copy is ours
            image = _converted(image, channels)
            array = np.asarray(image if fit is None else fit(image), dtype=np.uint8)
            return array[:, :, None] if array.ndim == 2 else array
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(path, "image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            path, f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except OSError as exc:
        if exc.errno in _OS_REASONS:
            raise ImageReadError(path, _OS_REASONS[exc.errno]) from None
        raise ImageReadError(path, f"cannot decode: {first_line(exc)}") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageReadError(path, f"cannot decode: {first_line(exc)}") from None
    except Exception as exc:  # a decoder bug must not crash a batch of thousands of files
        raise ImageReadError(path, f"cannot decode: {type(exc).__name__}: {exc}") from None


_OS_REASONS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "symbolic link loop",
    errno.EIO: "cannot read: input/output error",
}


def _with_notes(reason: str, said: list[str]) -> str:
    """A failure's reason with what the decoders said about the file, on one line."""
    notes = list(dict.fromkeys(" ".join(s.split()) for s in said if s.strip()))
    if not notes:
        return reason
    shown = "; ".join(notes[:3]) + (f"; and {len(notes) - 3} more" if len(notes) > 3 else "")
    return f"{reason} (decoder said: {shown})"


# Warnings are caught per thread (the folder source decodes on threads, and
# warnings.catch_warnings is not thread-safe): one hook routes those raised while a thread
# decodes into that thread's list, and leaves every other warning to the previous hook.
_decoding = threading.local()
_previous_showwarning = warnings.showwarning


def _route_warning(message, category, filename, lineno, file=None, line=None):
    sink = getattr(_decoding, "sink", None)
    if sink is None:
        _previous_showwarning(message, category, filename, lineno, file, line)
    else:
        sink.append(str(message))


@contextmanager
def _warnings_to(sink: list[str]) -> Iterator[None]:
    global _previous_showwarning
    if warnings.showwarning is not _route_warning:  # (re)installed, e.g. after catch_warnings
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _route_warning
    _decoding.sink = sink
    try:
        yield
    finally:
        _decoding.sink = None


class _LogToDecoding(logging.Handler):
    """Pillow's log records (its TIFF plugin logs errors) join the decoding file's notes; with
    this handler in place Python no longer prints them to stderr itself."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = getattr(_decoding, "sink", None)
        if sink is not None and record.levelno >= logging.WARNING:
            sink.append(record.getMessage())


logging.getLogger("PIL").addHandler(_LogToDecoding())


# libtiff writes its warnings and errors straight to file descriptor 2. While a TIFF decodes,
# descriptor 2 points at a temporary file (one TIFF at a time, since descriptors are shared by
# the whole process), and what was written there goes to the file's notes.
_native_stderr = threading.Lock()


@contextmanager
def _native_messages_to(sink: list[str]) -> Iterator[None]:
    with _native_stderr, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read(65536).decode("utf-8", "replace")
            sink.extend(line for line in text.splitlines() if line.strip())


def _converted(image: Image.Image, channels: int) -> Image.Image:
    """A decoded picture in `channels` (L or RGB): 16-bit and float samples scaled, palettes
    expanded, alpha composited on BACKGROUND."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples: scale to 8 bits (65535 -> 255), never clamp.
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, "L")
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def fit_image(array: np.ndarray, size: tuple[int, int], fit: str = "crop") -> np.ndarray:
    """Resize one decoded uint8 (H, W, C) image to `size`: shorter side then a centre crop
    (`crop`), or both sides independently (`stretch`)."""
    if array.shape[:2] == tuple(size):
        return array
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    out = np.asarray(fit_picture(image, size, fit), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def fit_picture(image: Image.Image, size: tuple[int, int], fit: str = "crop") -> Image.Image:
    """fit_image on a Pillow picture."""
    h, w = size
    if (image.height, image.width) == (h, w):
        return image
    if fit == "crop":
        (rh, rw), (top, left) = crop_box((image.height, image.width), size)
        image = image.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        image = image.crop((left, top, left + w, top + h))
    else:
        image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def crop_box(
    shape: tuple[int, int],
    size: tuple[int, int],
    scale: float | None = None,
    rng: random.Random | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """How a picture of `shape` (H, W) is cut to `size` (h, w): the (H', W') it is resized to
    first, its sides times `scale` (by default the least that covers `size`) and never below
    `size`; and the (top, left) of the crop in it, at the centre, or drawn from `rng` (the
    left first)."""
    (height, width), (h, w) = shape, size
    scale = max(h / height, w / width) if scale is None else scale
    resized = (max(h, round(height * scale)), max(w, round(width * scale)))
    if rng is None:
        return resized, ((resized[0] - h) // 2, (resized[1] - w) // 2)
    left = rng.randint(0, resized[1] - w)
    return resized, (rng.randint(0, resized[0] - h), left)


def decode_all(read: Callable[[T], R], items: list[T]) -> list[R]:
    """`read` over every item on threads (Pillow releases the GIL while it decodes), in order."""
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) + 2)) as pool:
        return list(pool.map(read, items))


def _is_link_loop(path: Path) -> bool:
    if not path.is_symlink():
        return False
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def list_images(roots: list[Path]) -> tuple[list[tuple[Path, Path]], list[Failure]]:
    """Image files under each root, recursively, as (root, file) pairs in sorted order.

    Follows symbolic links but visits each real directory once (no loops); unreadable
    directories are reported as failures, not raised.
    """
    found: list[tuple[Path, Path]] = []
    failures: list[Failure] = []
    for root in roots:
        if root.is_file():
            found.append((root.parent, root))
            continue
        seen: set[str] = set()

        def on_error(exc: OSError) -> None:
            failures.append(Failure(str(exc.filename), exc.strerror or "cannot read directory"))

        for current, dirs, files in os.walk(root, onerror=on_error, followlinks=True):
            real = os.path.realpath(current)
            if real in seen:
                failures.append(Failure(current, "directory visited already (symlink loop)"))
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            for name in sorted(files):
                path = Path(current) / name
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append((root, path))
                elif _is_link_loop(path):  # a folder link that loops shows up as a file
                    failures.append(Failure(str(path), "symbolic link loop"))
    return found, failures

"""The one image reader (DESIGN section 8) and the recursive image-file listing.

Every command and the folder data source read images through `read_image`; a file that cannot
be used raises ImageReadError with a reason a person can act on, never anything else.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats Pillow may open: no plugin outside this list ever parses a user's file.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Transparent pixels are composited on this fixed background (white).
BACKGROUND = (255, 255, 255)


class ImageReadError(Exception):
    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str


def read_image(path: str | Path, channels: int = 3, *, at_least: int | None = None) -> np.ndarray:
    """Decode one image file to uint8 (H, W, channels), safely; raises ImageReadError.

    `at_least` lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) as long as both sides
    stay at least that many pixels: much faster when the image is resized down anyway.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, a device never end
            raise ImageReadError(path, "not a regular file")
        with warnings.catch_warnings():
            # Pillow only warns between its two limits; a bomb is an error here at any size.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=ALLOWED_FORMATS) as image:
                if at_least and image.format == "JPEG":
                    image.draft(image.mode, (at_least, at_least))
                image.load()  # opening is lazy: decoding errors surface here
                image = ImageOps.exif_transpose(image)
                return _to_array(image, channels)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(path, "image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            path, f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except OSError as exc:
        if exc.errno in _OS_REASONS:
            raise ImageReadError(path, _OS_REASONS[exc.errno]) from None
        raise ImageReadError(path, f"cannot decode: {_first_line(exc)}") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageReadError(path, f"cannot decode: {_first_line(exc)}") from None
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


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
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
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def fit_image(array: np.ndarray, size: tuple[int, int], fit: str = "crop") -> np.ndarray:
    """Resize one decoded uint8 (H, W, C) image to `size`: shorter side then a centre crop
    (`crop`), or both sides independently (`stretch`)."""
    h, w = size
    if array.shape[:2] == (h, w):
        return array
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if fit == "crop":
        scale = max(h / image.height, w / image.width)
        resized = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (image.width - w) // 2, (image.height - h) // 2
        image = image.crop((left, top, left + w, top + h))
    else:
        image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = np.asarray(image, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


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
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append((root, Path(current) / name))
    return found, failures

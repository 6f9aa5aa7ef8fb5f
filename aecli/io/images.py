"""Writing PNGs, image sheets (grids, diff sheets) and the colour maps for error images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from aecli.io.atomic import atomic_write_bytes

# Diverging map for signed errors (ColorBrewer RdBu): blue < 0 < red, near-white at 0.
_DIVERGING = np.array(
    [[33, 102, 172], [103, 169, 207], [247, 247, 247], [239, 138, 98], [178, 24, 43]], np.float64
)
# Sequential map for error magnitudes (close to matplotlib's inferno): black -> yellow.
_HEAT = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    np.float64,
)
_TEXT_HEIGHT = 14


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 (H, W, C) with C in 1 or 3 -> PNG bytes (zlib level 6 is Pillow's default)."""
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


# zlib level of batch outputs (one PNG of thousands): 2-3x faster than 6, files 5-25% larger
BATCH_COMPRESS_LEVEL = 1


def save_png(path: str | Path, array: np.ndarray, *, batch: bool = False) -> None:
    """Write a PNG atomically. `batch` outputs trade a little size for speed
    (BATCH_COMPRESS_LEVEL) and skip the fsync."""
    data = png_bytes(array, compress_level=BATCH_COMPRESS_LEVEL if batch else 6)
    atomic_write_bytes(path, data, durable=not batch)


def gif_bytes(frames: list[np.ndarray], fps: float, at_least: int = 128) -> bytes:
    """uint8 (H, W, C) frames -> a looping animated GIF, `fps` frames per second. Small frames
    are enlarged by an integer factor (nearest, crisp pixels) to at least `at_least` pixels.
    GIF delays are whole hundredths of a second; the GIF encoder merges identical consecutive
    frames into one (their delays add up)."""
    h, w = frames[0].shape[:2]
    k = max(1, -(-at_least // max(h, w)))
    images = []
    for frame in frames:
        image = Image.fromarray(frame[:, :, 0] if frame.shape[2] == 1 else frame)
        images.append(image.resize((w * k, h * k), Image.Resampling.NEAREST) if k > 1 else image)
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(20, round(1000 / fps / 10) * 10),  # browsers slow delays under 20 ms
        loop=0,
    )
    return buffer.getvalue()


def _apply(values: np.ndarray, stops: np.ndarray, low: float) -> np.ndarray:
    positions = np.linspace(low, 1.0, len(stops))
    channels = [np.interp(values, positions, stops[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def diverging(values: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] (H, W) -> uint8 (H, W, 3), blue for negative, red for positive."""
    return _apply(np.clip(values, -1.0, 1.0), _DIVERGING, -1.0)


def heatmap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> uint8 (H, W, 3), dark for 0, bright yellow for 1."""
    return _apply(np.clip(values, 0.0, 1.0), _HEAT, 0.0)


def _fit_tile(array: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Enlarge by an integer factor (nearest, crisp pixels) or shrink (Lanczos) to fit th x tw,
    keeping the aspect ratio; centred on white."""
    h, w, c = array.shape
    image = Image.fromarray(array[:, :, 0] if c == 1 else array)
    if h <= th and w <= tw:
        k = min(th // h, tw // w)
        image = image.resize((w * k, h * k), Image.Resampling.NEAREST)
    else:
        scale = min(th / h, tw / w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    fitted = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, c)
    tile = np.full((th, tw, c), 255, dtype=np.uint8)
    top, left = (th - image.height) // 2, (tw - image.width) // 2
    tile[top : top + image.height, left : left + image.width] = fitted
    return tile


def compose_sheet(
    rows: list[list[np.ndarray]],
    *,
    pad: int = 2,
    min_tile: int = 64,
    max_tile: int = 256,
    header: list[str] | None = None,
    captions: list[str] | None = None,
) -> np.ndarray:
    """Lay out uint8 (H, W, C) images as a sheet, one list per row, on white.

    Every image gets the same tile: the largest image's size, enlarged by an integer factor
    until at least `min_tile` pixels (a 28x28 digit is readable on screen) and shrunk to at
    most `max_tile`. `header` labels the columns; `captions` adds a line of text above each row.
    Grayscale images are shown in colour when any image in the sheet is in colour.
    """
    images = [image for row in rows for image in row]
    channels = 3 if any(image.shape[2] == 3 for image in images) else 1
    th, tw = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    if max(th, tw) > max_tile:
        scale = max_tile / max(th, tw)
        th, tw = max(1, round(th * scale)), max(1, round(tw * scale))
    factor = max(1, -(-min_tile // max(th, tw)))
    th, tw = th * factor, tw * factor
    columns = max(len(row) for row in rows)
    text = _TEXT_HEIGHT if captions else 0
    top = _TEXT_HEIGHT if header else 0
    height = top + pad + len(rows) * (text + th + pad)
    sheet = np.full((height, pad + columns * (tw + pad), channels), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        y = top + pad + i * (text + th + pad) + text
        for j, image in enumerate(row):
            if image.shape[2] != channels:
                image = np.repeat(image, channels, axis=2)
            x = pad + j * (tw + pad)
            sheet[y : y + th, x : x + tw] = _fit_tile(image, th, tw)
    if header or captions:
        sheet = _draw_text(sheet, header or [], captions or [], th, tw, pad, top, text)
    return sheet


def _draw_text(sheet, header, captions, th, tw, pad, top, text) -> np.ndarray:
    image = Image.fromarray(sheet[:, :, 0] if sheet.shape[2] == 1 else sheet)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    ink = 0 if image.mode == "L" else (0, 0, 0)
    for j, label in enumerate(header):
        draw.text((pad + j * (tw + pad), 1), label, fill=ink, font=font)
    for i, caption in enumerate(captions):
        draw.text((pad, top + pad + i * (text + th + pad) + 1), caption, fill=ink, font=font)
    out = np.asarray(image, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def make_grid(rows: list[torch.Tensor], pad: int = 2, min_tile: int = 64) -> np.ndarray:
    """Stack rows of uint8 (N, C, H, W) images into one (H, W, C) sheet, one row each."""
    arrays = [[tile.permute(1, 2, 0).cpu().numpy() for tile in row] for row in rows]
    return compose_sheet(arrays, pad=pad, min_tile=min_tile, max_tile=max(min_tile, 256))

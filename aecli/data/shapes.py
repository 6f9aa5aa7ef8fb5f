"""The built-in data: coloured shapes on gradient backgrounds, generated from a seed.

Lets a new user see the whole training loop work with no download. Vectorised numpy, so two
thousand images take a fraction of a second.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ["circle", "square", "triangle", "ring"]


def make_shapes(
    count: int, size: tuple[int, int], channels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` images as uint8 (N, C, H, W) and their shape labels (N,), deterministic by seed."""
    rng = np.random.default_rng(seed)
    h, w = size
    labels = rng.integers(0, len(CLASS_NAMES), count)
    out = np.empty((count, 3, h, w), dtype=np.uint8)
    chunk = max(1, 2**22 // (h * w))  # bound the temporaries for large images
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        out[start:stop] = _render(rng, labels[start:stop], h, w)
    if channels == 1:
        luma = np.tensordot(np.array([0.299, 0.587, 0.114]), out.astype(np.float32), axes=(0, 1))
        out = np.rint(luma)[:, None].astype(np.uint8)
    return out, labels.astype(np.int64)


def _render(rng: np.random.Generator, labels: np.ndarray, h: int, w: int) -> np.ndarray:
    n = len(labels)
    scale = min(h, w)
    ys = (np.arange(h, dtype=np.float32) + 0.5)[None, :, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, None, :]

    def per_item(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)[:, None, None]

    cy = per_item(rng.uniform(0.35, 0.65, n) * h)
    cx = per_item(rng.uniform(0.35, 0.65, n) * w)
    radius = per_item(rng.uniform(0.16, 0.3, n) * scale)
    angle = per_item(rng.uniform(0, 2 * np.pi, n))
    dy, dx = ys - cy, xs - cx
    # rotate the frame so squares and triangles come at any angle
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    dist = np.sqrt(u**2 + v**2)
    # signed distance (in pixels) to each shape's edge; negative inside
    circle = dist - radius
    square = np.maximum(np.abs(u), np.abs(v)) - radius * 0.8
    k = np.float32(np.sqrt(3.0) / 2)
    triangle = (
        np.maximum.reduce([v - radius * 0.5, -k * u - 0.5 * v, k * u - 0.5 * v]) - radius * 0.5
    )
    ring = np.abs(dist - radius * 0.8) - radius * 0.25
    signed = np.select(
        [labels[:, None, None] == i for i in range(4)], [circle, square, triangle, ring]
    )
    coverage = np.clip(0.5 - signed, 0.0, 1.0)[:, None]  # antialiased edge, (N, 1, H, W)

    background = rng.uniform(0.05, 0.55, (n, 3)).astype(np.float32)[:, :, None, None]
    direction = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    ramp = (
        np.cos(direction)[:, None, None] * (xs / w - 0.5)
        + np.sin(direction)[:, None, None] * (ys / h - 0.5)
    )[:, None]
    background = background + 0.3 * ramp
    colour = rng.uniform(0.45, 1.0, (n, 3)).astype(np.float32)[:, :, None, None]
    image = background * (1 - coverage) + colour * coverage
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)

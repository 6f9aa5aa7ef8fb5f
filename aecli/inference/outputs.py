"""Output images: where each goes (never two onto one path), PNGs written on threads, one sheet
or a folder."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from aecli.errors import UsageError
from aecli.inference.inputs import InputFile
from aecli.io.images import compose_sheet, save_png


def plan_outputs(files: list[InputFile], out_dir: Path) -> list[Path]:
    """One PNG per input, keeping relative paths. `a.jpg` and `a.png` side by side keep their
    suffix (`a.jpg.png`, `a.png.png`); other clashes (the same name in two inputs) are refused."""
    stems = [Path(f.name).with_suffix(".png").as_posix() for f in files]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = [
        stem if counts[stem] == 1 else f"{f.name}.png" for stem, f in zip(stems, files, strict=True)
    ]
    seen: dict[str, InputFile] = {}
    for name, file in zip(names, files, strict=True):
        if name in seen:
            raise UsageError(
                f"{seen[name].path} and {file.path} would both be written to "
                f"{out_dir / name}; reconstruct those inputs into separate folders"
            )
        seen[name] = file
    return [out_dir / name for name in names]


def reconstruction_outputs(
    out: Path | None, files: list[InputFile], count: int
) -> list[Path] | None:
    """Where `reconstruct -o` writes each file's reconstruction: nowhere without -o; for
    `-o name.png`, that one image file, which needs exactly one input (`count` of them, read or
    not); else one PNG per file in the folder `out` (`plan_outputs`)."""
    if out is None:
        return None
    if not is_grid(out):
        return plan_outputs(files, out)
    if count != 1:
        raise UsageError(
            f"-o {out} names one image file, but the inputs hold {count} images: give a "
            f"folder (-o {out.with_suffix('')}/) for one PNG each, or --grid {out} for a sheet"
        )
    return [out] * len(files)


class PngWriter:
    """Encodes and writes batch PNGs on threads (Pillow releases the GIL while compressing;
    one per core, 2 to 8), a bounded number in flight; leaving the `with` block waits for
    all."""

    def __init__(self, threads: int | None = None):
        threads = threads or min(8, max(2, os.cpu_count() or 2))
        self.pool = ThreadPoolExecutor(threads)
        self.pending: deque[Future] = deque()
        self.limit = threads * 4

    def save(self, path: Path, array: np.ndarray) -> None:
        self.pending.append(self.pool.submit(save_png, path, array, batch=True))
        if len(self.pending) > self.limit:
            self.pending.popleft().result()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown()


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


def is_grid(out: Path) -> bool:
    """`-o name.png` asks for one sheet; anything else is a folder of PNGs."""
    return out.suffix.lower() == ".png"


def image_outputs(out: Path, names: list[str]) -> list[Path]:
    """The files `write_images` writes: the sheet, or one PNG per name in the folder."""
    return [out] if is_grid(out) else [out / name for name in names]


def write_images(
    images: Iterable[np.ndarray], out: Path, names: list[str], *, columns: int = 8
) -> None:
    """Images into one sheet (`columns` per row) for `-o name.png` (one image: that image, as
    it is), else into the folder `out` as one PNG per image, named by `names` (written on
    threads as the images arrive)."""
    if is_grid(out):
        images = list(images)
        if len(images) == 1:  # a sheet of one is the image itself, without a border
            save_png(out, images[0])
            return
        rows = [images[i : i + columns] for i in range(0, len(images), columns)]
        save_png(out, compose_sheet(rows))
        return
    with PngWriter() as writer:
        for path, image in zip(image_outputs(out, names), images, strict=True):
            writer.save(path, image)


def _usable(source: str) -> bool:
    """Whether a source name can name a file: a last part to put .png on, no NUL, and parts
    a file system takes (at most 250 bytes each, with the suffix)."""
    path = Path(source)
    parts = path.parts
    return (
        bool(path.name)
        and "\0" not in source
        and all(len(part.encode("utf-8", "surrogateescape")) <= 250 for part in parts)
    )


def decoded_names(sources: list[str] | None, count: int) -> list[str]:
    """File names for decoded latents: each source name as .png (relative folders kept) when
    they are distinct and stay inside the output folder; else 000000.png, 000001.png, ..."""
    if sources and all(_usable(s) for s in sources):
        names = [Path(s).with_suffix(".png") for s in sources]
        safe = all(not n.is_absolute() and ".." not in n.parts for n in names)
        if safe and len({n.as_posix() for n in names}) == count:
            return [n.as_posix() for n in names]
    width = max(6, len(str(count - 1)))
    return [f"{i:0{width}d}.png" for i in range(count)]

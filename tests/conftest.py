from __future__ import annotations

import io
import os
import signal
import stat
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aecli.cli import app

ROOT = Path(__file__).resolve().parent.parent

# A small preset for fast tests: 16x16 RGB, a few hundred built-in images, one epoch.
TINY = """\
# tiny: a test preset
data: {image_size: 16, channels: 3, builtin_count: 96}
model:
  encoder:
    - {type: conv, out: 8, stride: 2, act: relu}
    - {type: conv, out: 8, stride: 2, act: relu}
  latent: {dim: 8}
  decoder:
    - {type: linear, out: 128, act: relu}
    - {type: reshape, shape: [8, 4, 4]}
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv, out: 3}
train: {epochs: 2, batch_size: 32, grid_images: 4}
"""


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_preset(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 8x8 handwritten digits, upsampled to 28x28, as an .npz."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype("float32") / 16.0)[:, None]
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, images=images.clamp(0, 1).numpy()[:, 0], labels=digits.target)
    return path


# A fully convolutional VAE (spatial 2x4x4 latent from 16x16): reconstructs any image size.
TINY_CONV = """\
# tiny-conv: a fully convolutional test preset
data: {image_size: 16, channels: 3, builtin_count: 96}
model:
  encoder:
    - {type: conv, out: 8, stride: 2, act: relu}
    - {type: conv, out: 8, stride: 2, act: relu}
  latent: {channels: 2, variational: true}
  decoder:
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv, out: 3}
train: {epochs: 2, batch_size: 32, grid_images: 2}
"""


def epochs_of(run: Path) -> list[dict]:
    """The epoch records of a run's metrics.jsonl (it also holds one per logging window)."""
    from aecli.run.files import RunDirectory

    return RunDirectory(run).history()


def train_weights(directory: Path, preset_text: str, overrides: list[str] = ()) -> Path:
    """Train a tiny preset on the built-in shapes (a few seconds) and return its weights file."""
    from aecli.config import load_config
    from aecli.data import load_data
    from aecli.run.training import train

    directory.mkdir(parents=True, exist_ok=True)
    preset = directory / "preset.yaml"
    preset.write_text(preset_text)
    config = load_config(str(preset), list(overrides)).config
    data = load_data(None, config.data, config.train.seed)
    return train(config, data, directory / "run", preset="tiny").weights


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Vector-latent autoencoder weights (16x16 RGB in, 8-dim latent)."""
    return train_weights(tmp_path_factory.mktemp("tiny"), TINY, ["train.epochs=4"])


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory) -> Path:
    """The same architecture trained with another seed and for fewer epochs."""
    return train_weights(tmp_path_factory.mktemp("other"), TINY, ["train.seed=7"])


@pytest.fixture(scope="session")
def conv_weights(tmp_path_factory) -> Path:
    return train_weights(tmp_path_factory.mktemp("conv"), TINY_CONV)


def write_image(path: Path, size=(16, 16), seed: int = 0, mode: str = "RGB") -> np.ndarray:
    """A small image with structure (a square on a background); returns its pixels."""
    rng = np.random.default_rng(seed)
    h, w = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return pixels


AECLI = f'"{sys.executable}" -m aecli'  # for commands run through a real shell


def shell(command: str) -> subprocess.CompletedProcess:
    """Run a command line (pipes and all) through /bin/sh; text output captured."""
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)


def one_line(result) -> str:
    """A CLI result's stderr, checked to be one line and no internal error."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    return lines[0]


def pixels(path: Path) -> np.ndarray:
    """An image file's pixels as written."""
    return np.asarray(Image.open(path))


def read_pngs(folder: Path) -> dict[str, np.ndarray]:
    """Every PNG under folder, by relative path."""
    return {p.relative_to(folder).as_posix(): pixels(p) for p in folder.rglob("*.png")}


def _png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def write_image_zoo(root: Path) -> dict[str, str | None]:
    """Every awkward input an image reader meets, written under root.

    Returns {relative path: None if it must be read, else a fragment of the failure reason}.
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    def add(name: str, reason: str | None) -> Path:
        expected[name] = reason
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    write_image(add("good.png", None))
    write_image(add("nested/deeper/good.jpg", None), size=(24, 20), seed=1)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)).save(
        buffer, "JPEG"
    )
    add("truncated.jpg", "truncated").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8)).save(
        buffer, "PNG"
    )
    add("truncated.png", "cannot decode").write_bytes(buffer.getvalue()[:300])
    add("empty.png", "not an image").write_bytes(b"")
    add("random.jpg", "not an image").write_bytes(np.random.default_rng(4).bytes(2048))
    add("notes.png", "not an image").write_text("this is not a picture\n")
    add("bomb.png", "decompression bomb").write_bytes(_png_claiming(30000, 30000))
    Image.fromarray(np.full((12, 10, 3), (10, 200, 30), np.uint8)).save(
        add("really-a-tiff.jpg", None), format="TIFF"
    )
    gray16 = np.array([[0, 1000, 32896, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(gray16).save(add("gray16.png", None))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((0, 0), 1)
    palette.save(add("palette.png", None), transparency=0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(add("rgba.png", None))
    la = np.zeros((4, 4, 2), np.uint8)
    la[0, 0] = (0, 255)
    Image.fromarray(la, "LA").save(add("la.png", None))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(add("cmyk.jpg", None), quality=95)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(add("animated.gif", None), save_all=True, append_images=frames[1:])
    rotated = np.zeros((10, 30, 3), np.uint8)
    rotated[:, :15] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rotated).save(add("rotated.jpg", None), exif=exif, quality=95)
    os.symlink("loop.png", add("loop.png", "symbolic link loop"))
    os.symlink(root, add("nested/back", "symlink loop"))  # a directory loop
    os.mkfifo(add("pipe.png", "not a regular file"))
    if os.geteuid() == 0:  # root reads any file; /proc/self/mem fails to read for everyone
        os.symlink("/proc/self/mem", add("unreadable.png", "cannot read"))
    else:
        path = add("unreadable.png", "permission denied")
        write_image(path)
        path.chmod(0)
    return expected


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (not following links): its kind and, for files, its bytes."""
    state = {}
    for current, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(current) / name
            info = path.lstat()
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode) and os.access(path, os.R_OK):
                state[str(path)] = ("file", info.st_mode, path.read_bytes(), info.st_mtime_ns)
            else:
                state[str(path)] = ("other", info.st_mode)
    return state


@contextmanager
def within(seconds: int):
    """Fail, rather than hang the suite, where the code under test blocks (on a FIFO, say)."""

    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def photos(folder: Path, size=(48, 64)) -> list[Path]:
    """Two crops of scikit-learn's sample photos (real colour photos, no download), as PNGs."""
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(load_sample_images().images):
        path = folder / f"photo{i}.png"
        Image.fromarray(image[100 : 100 + size[0], 200 : 200 + size[1]]).save(path)
        paths.append(path)
    return paths


def fine_tune_frozen_encoder(cli, vae: Path, out: Path):
    """`aecli train --init VAE` for one short epoch with the encoder frozen: every tensor
    outside the decoder stays exactly as loaded, the decoder moves. The fine-tuned model."""
    from aecli.io.weights import load_weights

    result = cli(
        "train", "--init", vae, "--out", out, "--epochs", "1",
        "--set", "data.builtin_count=16", "--set", "data.image_size=32",
        "--set", "train.freeze=encoder", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Initialised from" in result.output
    tuned = load_weights(out / "model.safetensors")[0]
    before, after = load_weights(vae)[0].state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("decoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    return tuned


@contextmanager
def folder_held(lock: Path):
    """Another process holding `lock` as aecli's folder locks are held (fcntl.lockf, its
    process id written in the file) while the body runs; yields that process's id."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"""
import fcntl, os, time
fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def image_chw(path: Path) -> torch.Tensor:
    """An image file's pixels as a float tensor (C, H, W), 0 to 255."""
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float()


def check_folder_and_commands(cli, vae: Path, images: list[Path], expected, tmp_path: Path,
                              *encode_args: str) -> None:  # fmt: skip
    """A VAE folder through the commands beside encoding to a file: its latent folder (encoded
    with `encode_args`) decoded back, reconstruct, interpolate and diff; decoded and
    reconstructed pixels within one 8-bit level of `expected`, the reference decoder's."""
    photos = images[0].parent
    result = cli("encode", vae, photos, "-o", tmp_path / "folder/", *encode_args)
    assert result.exit_code == 0, result.output
    result = cli("decode", vae, tmp_path / "folder", "-o", tmp_path / "dec2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (image_chw(tmp_path / "dec2" / images[0].name) - expected[0]).abs().max() <= 1
    result = cli("reconstruct", vae, photos, "-o", tmp_path / "rec", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (image_chw(tmp_path / "rec" / images[1].name) - expected[1]).abs().max() <= 1
    result = cli("interpolate", vae, *images, "-o", tmp_path / "strip.png", "--steps", "3")
    assert result.exit_code == 0, result.output
    result = cli("diff", vae, photos, "-o", tmp_path / "diff.png")
    assert result.exit_code == 0, result.output


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images on the 0..255 scale (inf where they are equal)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def check_exact_tiles(vae: Path, smallest_refused: int | None = None):
    """A VAE's exact tiles of 128 on a 500x372 image against untiled: the latents within 1e-3
    of their range, decode and reconstruct at least 50 dB; `smallest_refused`: a tile too small
    for the model's context, refused in one line. The tiled Predictor."""
    from aecli.errors import UsageError
    from aecli.inference import Predictor

    torch.manual_seed(2)
    image = (torch.rand(1, 3, 1, 1) * 255 + torch.randn(1, 3, 372, 500) * 40).clamp(0, 255)
    image = image.to(torch.uint8)
    whole = Predictor(vae, "cpu")
    whole.set_tiling(0, None, 4)
    z = whole.encode(image)
    untiled = whole.decode(z)
    tiles = Predictor(vae, "cpu")
    tiles.set_tiling(128, None, 4)
    assert tiles.smallest_exact_tile <= 128
    z_tiled = tiles.encode(image)
    spread = (z.max() - z.min()).item()
    assert (z_tiled - z).abs().max().item() <= 1e-3 * spread
    assert psnr(tiles.decode(z), untiled) >= 50
    assert psnr(tiles.reconstruct(image), whole.reconstruct(image)) >= 50
    if smallest_refused is not None:
        with pytest.raises(UsageError, match="exact tiles this small"):
            tiles.set_tiling(smallest_refused, None, 4)
    return tiles


def check_automatic_tiling(vae: Path, monkeypatch, size: tuple[int, int] = (200, 264)) -> None:
    """With half the free memory an image of `size` (H, W) needs, reconstruct works in exact
    tiles without being asked, says so in one line, and equals untiled (at least 50 dB)."""
    from aecli.inference import Predictor, predictor

    said = []
    whole = Predictor(vae, "cpu")
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    expected = whole.reconstruct(image)
    tight = Predictor(vae, "cpu", notify=said.append)
    need = tight._activation_bytes("reconstruct", (3, *size))
    monkeypatch.setattr(predictor, "available_memory", lambda _device: need // 2)
    assert psnr(tight.reconstruct(image), expected) >= 50
    assert said and "working in exact tiles" in said[0]

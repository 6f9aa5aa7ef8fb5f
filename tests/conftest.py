from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
    import numpy as np
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype("float32") / 16.0)[:, None]
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, images=images.clamp(0, 1).numpy()[:, 0], labels=digits.target)
    return path

"""LPIPS (Zhang et al. 2018) as a loss term, from the `lpips` package with its VGG heads.

The VGG16 trunk's ImageNet weights are torchvision's `vgg16-397923af.pth`, looked up where
torchvision caches them (`torch.hub.get_dir()/checkpoints`, moved by TORCH_HOME); aecli never
downloads, so a missing file stops the run before training with one line saying where it goes.
The file is read with torch's safe loader (`weights_only=True`: tensors only, no code).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from aecli.errors import ConfigError, first_line

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
# torchvision's vgg16.features indices in each of lpips' five slices
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def vgg16_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def check_available() -> None:
    """One line naming what is missing (the lpips package, the VGG16 weights), or nothing."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise ConfigError(
            ["loss.perceptual_weight needs the lpips package: pip install 'aecli[lpips]'"]
        ) from None
    path = vgg16_path()
    if not path.is_file():
        raise ConfigError(
            [
                f"loss.perceptual_weight: LPIPS needs torchvision's VGG16 ImageNet weights at "
                f"{path}, which is missing; aecli never downloads: save {VGG16_URL} there (or "
                "set TORCH_HOME to a folder whose hub/checkpoints holds it)"
            ]
        )


def load_lpips(device: torch.device) -> nn.Module:
    """LPIPS-VGG, frozen, in eval mode on `device`: images in [-1, 1] -> (B, 1, 1, 1)."""
    check_available()
    import lpips

    with warnings.catch_warnings():  # torchvision's note on the `pretrained` argument lpips uses
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    path = vgg16_path()
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
        trunk = {}
        for key, value in features.items():
            if key.startswith("features."):
                index, name = key.split(".")[1:]
                n = next(i for i, (a, b) in enumerate(_SLICES, 1) if a <= int(index) < b)
                trunk[f"slice{n}.{index}.{name}"] = value
        model.net.load_state_dict(trunk)
    except Exception as exc:  # noqa: BLE001  (a damaged or foreign file, whatever the failure)
        raise ConfigError(
            [
                f"loss.perceptual_weight: {path} is not torchvision's VGG16 weights "
                f"({first_line(exc)})"
            ]
        ) from None
    return model.eval().requires_grad_(False).to(device)

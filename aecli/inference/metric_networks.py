"""The pretrained networks `aecli eval` measures with, read from local files only, never by
unpickling: torch-fidelity's InceptionV3 for FID (as torchmetrics runs it) and LPIPS's AlexNet
or VGG16 trunk under the `lpips` package's linear heads.

Nothing is downloaded. A file named by an option, or else found in torch's hub cache
(`torch.hub.get_dir()/checkpoints`, moved by TORCH_HOME), is read with
`torch.load(weights_only=True)` (tensors and plain containers only: no code runs) or as
safetensors, and checked to be a dict of tensors before a network is built from it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from aecli.errors import UsageError, first_line

# torch-fidelity's conversion of the TensorFlow FID Inception (2015-12-05), which torchmetrics
# downloads; pytorch-fid's file carries the same hash prefix and the same key layout
INCEPTION_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILES[0]
)
FID_FEATURES = 2048

# torchvision's ImageNet trunks that LPIPS's heads were trained on, and which indices of
# torchvision's `features` each of lpips' slices holds
LPIPS_TRUNKS = {
    "alex": ("AlexNet", "alexnet-owt-7be5be79.pth", ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))),
    "vgg": ("VGG16", "vgg16-397923af.pth", ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))),
}
TORCHVISION_MODELS = "https://download.pytorch.org/models/"


def hub_checkpoints() -> Path:
    """Where torch's hub keeps downloaded weights (torchvision's and torch-fidelity's)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def require_packages(*, fid: bool, lpips: bool) -> None:
    """One line naming the extra to install where a metric asked for needs a missing package."""
    if fid:
        missing = [n for n in ("torchmetrics", "torch_fidelity") if _absent(n)]
        if missing:
            names = " and ".join(n.replace("_", "-") for n in missing)
            raise UsageError(f"rFID needs {names}: pip install 'aecli[eval]'")
    if lpips and _absent("lpips"):
        raise UsageError("LPIPS needs the lpips package: pip install 'aecli[lpips]'")


def _absent(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def find_weights(given: Path | None, names: tuple[str, ...], option: str, what: str, url: str):
    """The weights file `option` names, or the first of `names` in torch's hub cache; else one
    line naming where aecli looked and how to provide the file."""
    if given is not None:
        if not given.is_file():
            raise UsageError(f"{option} {given}: not found")
        return given
    folder = hub_checkpoints()
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise UsageError(
        f"{what} needs {names[0]}, not found in {folder}; aecli never downloads: save {url} "
        f"there (or set TORCH_HOME to a folder whose hub/checkpoints holds it), or give "
        f"{option} FILE"
    )


def inception_path(given: Path | None) -> Path:
    return find_weights(
        given, INCEPTION_FILES, "--fid-weights", "rFID (torch-fidelity's Inception)", INCEPTION_URL
    )


def lpips_path(net: str, given: Path | None) -> Path:
    name, file, _ = LPIPS_TRUNKS[net]
    return find_weights(
        given,
        (file,),
        "--lpips-weights",
        f"LPIPS-{net} (torchvision's {name} ImageNet weights)",
        TORCHVISION_MODELS + file,
    )


def read_tensors(path: Path, option: str) -> dict[str, torch.Tensor]:
    """A weights file's tensors, by name: safetensors, or torch.load(weights_only=True), which
    refuses a pickle that would build anything but tensors and plain containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path), device="cpu")
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001  (a foreign or damaged file, whatever the failure)
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            reason = "it holds more than tensors, and aecli never unpickles code"
        else:
            reason = first_line(exc)
        raise UsageError(f"{option} {path}: refused: {reason}") from None
    if not (
        isinstance(tensors, dict)
        and tensors
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
    ):
        raise UsageError(f"{option} {path}: not a state dict (a dict of named tensors)")
    floats = (k for k, v in tensors.items() if v.is_floating_point())
    bad = next((k for k in floats if not tensors[k].isfinite().all()), None)
    if bad is not None:
        raise UsageError(f"{option} {path}: {bad} holds non-finite values")
    return tensors


def file_digest(path: Path) -> str:
    """The file's SHA-256, hex: which weights a figure was measured with."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception(path: Path, device: torch.device) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 (torch-fidelity's network, 2048 pooled features; uint8
    images in, resized to 299 with antialiasing and scaled by (x - 128) / 128) on `device`.

    torch-fidelity's constructor always loads its weights with torch.load(weights_only=False),
    which would run code from a hostile file. It is handed instead an in-memory copy that aecli
    serialises from the tensors it read safely: a pickle of plain tensors, written here, is all
    that constructor unpickles (no temporary file, no download)."""
    tensors = read_tensors(path, "--fid-weights")
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    buffer.seek(0)
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        network = NoTrainInceptionV3("inception-v3-compat", [str(FID_FEATURES)], buffer)
    except RuntimeError as exc:  # load_state_dict: keys or shapes that do not fit
        raise UsageError(
            f"--fid-weights {path}: not torch-fidelity's InceptionV3 weights "
            f"({_state_dict_problem(exc)})"
        ) from None
    return network.to(device)


def load_lpips(net: str, path: Path, device: torch.device) -> nn.Module:
    """LPIPS (v0.1, the `lpips` package's linear heads) over torchvision's AlexNet or VGG16
    trunk read from `path`, frozen, on `device`: images in [-1, 1] -> (B, 1, 1, 1)."""
    import lpips

    name, _, slices = LPIPS_TRUNKS[net]
    tensors = read_tensors(path, "--lpips-weights")
    with warnings.catch_warnings():  # torchvision's note on the `pretrained` argument lpips uses
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    trunk = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "features" or not parts[1].isdigit():
            continue  # the classifier, which LPIPS does not use
        index = int(parts[1])
        slice_number = next((n for n, (a, b) in enumerate(slices, 1) if a <= index < b), None)
        if slice_number is not None:
            trunk[f"slice{slice_number}.{index}.{parts[2]}"] = value
    try:
        model.net.load_state_dict(trunk)
    except RuntimeError as exc:
        raise UsageError(
            f"--lpips-weights {path}: not torchvision's {name} weights ({_state_dict_problem(exc)})"
        ) from None
    return model.eval().requires_grad_(False).to(device)


def _state_dict_problem(exc: RuntimeError) -> str:
    """load_state_dict's complaint cut to its first item: `Missing key(s) in state_dict:
    "Conv2d_1a_3x3.conv.weight", ...` or the first shape that does not fit."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    if not lines:
        return first_line(exc)
    head, _, rest = lines[0].partition(": ")
    if not head.endswith("key(s) in state_dict"):  # size mismatch for NAME: copying a param...
        return head
    items = rest.split(", ")
    return f"{head}: {items[0]}" + (f" and {len(items) - 1} more" if len(items) > 1 else "")

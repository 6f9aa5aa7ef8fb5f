"""`aecli eval`: PSNR, SSIM, LPIPS and rFID of a model's reconstructions (or of reconstructions
given as files), under declared settings, streamed over batches in bounded memory.

The definitions are the references' (tests/test_eval.py holds aecli to them):
- PSNR: the mean over images of 10 log10(255^2 / MSE) on the 8-bit images (torchmetrics'
  `peak_signal_noise_ratio(data_range=255)` image by image; an exact copy counts PSNR_CAP_DB);
- SSIM: torchmetrics' (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 255,
  reflected borders), mean over images;
- LPIPS: the `lpips` package (v0.1 linear heads) over torchvision's AlexNet or VGG16 trunk,
  images in [-1, 1] at their own size, mean over images;
- rFID: torchmetrics' FrechetInceptionDistance with torch-fidelity's Inception (2048 pooled
  features), originals against reconstructions; torchmetrics keeps running float64 sums of the
  features and of their outer products, so memory does not grow with the number of images.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aecli.data.images import Failure, ImageReadError, decode_all, list_images, read_image
from aecli.errors import UsageError, first_and_more
from aecli.inference.inputs import (
    Buckets,
    InputFile,
    Progress,
    image_tensor,
    load_batches,
    no_progress,
)
from aecli.inference.predictor import Predictor
from aecli.losses import reflect_pad

PSNR_CAP_DB = 100.0  # an exact copy (MSE 0), as `reconstruct --metrics` counts it
LPIPS_NETS = ("alex", "vgg")
# FID's covariance has full rank only with more images than features
FID_FULL_RANK = 2049
# SSIM (in float64) and LPIPS see at most this many pixels a call: 16 images of 256x256
PIXELS_PER_CALL = 16 * 256 * 256


@dataclass(frozen=True)
class EvalSettings:
    """What `aecli eval` measures and how: each becomes a named field of its --json."""

    size: tuple[int, int] | None = None  # --size: shorter side resized, then a centre crop
    sample: bool = False  # decode a draw from the posterior instead of its mean
    seed: int = 0
    lpips: str | None = None  # alex | vgg
    lpips_weights: Path | None = None
    fid: bool = False
    fid_weights: Path | None = None


@dataclass
class Evaluation:
    rows: list[dict]  # per image, input order: file, psnr, ssim (, lpips)
    failures: list[Failure]
    metrics: dict[str, float]  # psnr, ssim (, lpips, rfid)
    sizes: set[tuple[int, int]]  # the image sizes measured
    seconds: float  # reconstructing and scoring every image (the running time per image)
    peak_memory: int  # bytes
    memory_measure: str
    fid_seconds: float = 0.0  # rFID's final matrix square root, once per evaluation

    @property
    def images_per_second(self) -> float:
        return len(self.rows) / max(self.seconds, 1e-9)

    @property
    def image_size(self) -> str:
        """`256x256`, or the range of sizes where images kept their own."""
        if not self.sizes:
            return "none"
        shown = sorted(f"{h}x{w}" for h, w in self.sizes)
        if len(shown) == 1:
            return shown[0]
        smallest, largest = min(self.sizes), max(self.sizes)
        return (
            f"{len(shown)} sizes, {smallest[0]}x{smallest[1]} to {largest[0]}x{largest[1]} "
            "(each image at its own)"
        )


class Scores:
    """PSNR and SSIM (and LPIPS, rFID where asked) of pairs of uint8 images, batch by batch:
    per-image values come out, FID's running sums stay inside."""

    def __init__(self, lpips: nn.Module | None = None, fid: nn.Module | None = None):
        self.lpips, self.fid = lpips, fid

    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, list]:
        """uint8 (B, C, H, W) pairs on one device -> {metric: one value per image}."""
        a, b = originals, reconstructions
        mse = (a.double() - b.double()).square().flatten(1).mean(dim=1)
        floor = 255.0**2 * 10 ** (-PSNR_CAP_DB / 10)
        # SSIM and LPIPS a few images at a time: their memory follows the pixels per call
        step = max(1, PIXELS_PER_CALL // (a.shape[-2] * a.shape[-1]))
        parts = list(zip(a.split(step), b.split(step), strict=True))
        scores = {
            "psnr": 10 * torch.log10(255.0**2 / mse.clamp_min(floor)),
            "ssim": torch.cat([ssim_8bit(y, x) for x, y in parts]),
        }
        if self.lpips is not None:
            scores["lpips"] = torch.cat([self._lpips(y, x) for x, y in parts])
        if a.shape[1] == 1:  # Inception takes RGB
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        if self.fid is not None:
            self.fid.update(a, real=True)
            self.fid.update(b, real=False)
        return {name: values.tolist() for name, values in scores.items()}

    def _lpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # the trunks take RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.lpips(x.float() / 127.5 - 1, y.float() / 127.5 - 1).flatten()

    def rfid(self) -> float:
        """The Frechet distance of the reconstructions' features to the originals' (the float64
        statistics moved to the CPU first: its eigenvalue solver runs on every build)."""
        return float(self.fid.to("cpu").compute())


def ssim_8bit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image of uint8 (B, C, H, W) images, in float64: torchmetrics' definition
    (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 255, reflected borders, the
    mean over every pixel and channel). aecli.losses.ssim is the same in float32 for training;
    in float32 its moments lose about 3e-5 of SSIM to cancellation, float64 none that shows."""
    x, y = x.double(), y.double()
    channels, pad = x.shape[1], 5
    coords = torch.arange(11, dtype=torch.float64, device=x.device) - pad
    gauss = torch.exp(-0.5 * (coords / 1.5) ** 2)
    gauss = gauss / gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).expand(channels, 1, 11, 11).contiguous()
    inputs = reflect_pad(torch.cat([x, y, x * x, y * y, x * y]), pad)
    mu_x, mu_y, xx, yy, xy = F.conv2d(inputs, kernel, groups=channels).split(len(x))
    var_x, var_y = (xx - mu_x**2).clamp_min(0), (yy - mu_y**2).clamp_min(0)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * (xy - mu_x * mu_y) + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.flatten(1).mean(dim=1)


def load_scores(settings: EvalSettings, device: torch.device) -> tuple[Scores, dict]:
    """The networks the settings ask for, read from local files, and their declaration:
    {"lpips": {...}, "rfid": {...}} (None for a metric not asked for)."""
    from aecli.inference import metric_networks as nets

    nets.require_packages(fid=settings.fid, lpips=settings.lpips is not None)
    lpips = fid = None
    declared: dict = {"lpips": None, "rfid": None}
    if settings.lpips is not None:
        path = nets.lpips_path(settings.lpips, settings.lpips_weights)
        lpips = nets.load_lpips(settings.lpips, path, device)
        declared["lpips"] = {
            "net": settings.lpips,
            "heads": f"lpips {_version('lpips')} package, v0.1 linear heads",
            "trunk_weights": str(path),
            "trunk_sha256": nets.file_digest(path),
            "input": "RGB in [-1, 1], at the measured size",
            "reduction": "mean over images",
        }
    if settings.fid:
        from torchmetrics.image.fid import FrechetInceptionDistance

        path = nets.inception_path(settings.fid_weights)
        inception = nets.load_inception(path, torch.device("cpu"))
        fid = FrechetInceptionDistance(feature=inception, reset_real_features=True).to(device)
        declared["rfid"] = {
            "network": "torch-fidelity's InceptionV3 (the TF FID Inception, 2015-12-05), "
            "run by torchmetrics",
            "weights": str(path),
            "weights_sha256": nets.file_digest(path),
            "features": nets.FID_FEATURES,
            "resize": "bilinear with antialiasing to 299x299 (torchmetrics' default)",
            "scaling": "(x - 128) / 128 of the 8-bit values",
            "statistics": "float64 mean and covariance over all images: reconstructions "
            "against their originals",
            "versions": {
                "torchmetrics": _version("torchmetrics"),
                "torch-fidelity": _version("torch-fidelity"),
            },
        }
    return Scores(lpips, fid), declared


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def model_loading(predictor: Predictor, size: tuple[int, int] | None):
    """(size, buckets) for load_batches: a fully convolutional model sees each image at its
    own size, or --size's centre crop; a model of one input size sees images stretched to it
    (as `reconstruct`), or --size's crop where --size is that size."""
    if size is not None:
        if not predictor.fully_convolutional and tuple(size) != predictor.size:
            h, w = predictor.size
            raise UsageError(
                f"--size {size[0]}x{size[1]}: this model takes {predictor.accepts} images only; "
                f"give --size {h}x{w} or leave it out"
            )
        if min(size) < predictor.smallest_side:
            raise UsageError(
                f"--size {size[0]}x{size[1]}: too small for this model (at least "
                f"{predictor.smallest_side}x{predictor.smallest_side})"
            )
        return None, Buckets([tuple(size)])
    return (None if predictor.fully_convolutional else predictor.size), None


def evaluate_model(
    predictor: Predictor,
    files: list[InputFile],
    settings: EvalSettings,
    scores: Scores,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = no_progress,
) -> Evaluation:
    """Reconstruct every file (the posterior's mean, or a seeded draw per image with
    `settings.sample`) and measure it against the image the model saw."""
    if settings.sample and not predictor.variational:
        raise UsageError(
            f"--sample decodes a draw from a VAE's posterior; this is {predictor.kind}"
        )
    size, buckets = model_loading(predictor, settings.size)
    failures: dict[int, Failure] = {}
    execution = predictor.execution

    def pairs() -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        for batch in load_batches(
            files,
            predictor.channels,
            size,
            predictor.images_per_batch(batch_size),
            workers,
            failures=failures,
            progress=progress,
            original_sizes=True,  # full-scale JPEG decoding: the image as published
            pin_memory=execution.pins_memory,
            buckets=buckets,
            smallest=predictor.smallest_side,
        ):
            images = execution.to_device(batch.images)
            yield batch.indices, images, _reconstructed(predictor, images, batch.indices, settings)

    return _measure(pairs(), files, failures, scores, predictor.device, progress)


def _reconstructed(predictor: Predictor, images: torch.Tensor, numbers: list[int], settings):
    """uint8 reconstructions: of the posterior's mean, or of a draw seeded per image number
    (the same whatever the batch)."""
    if not settings.sample:
        return predictor.reconstruct(images)
    h, w = images.shape[-2:]
    z = predictor.encode(images, predictor.image_generators(settings.seed, numbers))
    return predictor.decode(z)[..., :h, :w]  # (B, C, H, W): the padding cut off


def match_reconstructions(files: list[InputFile], folder: Path) -> list[Path]:
    """The file in `folder` for each input, by its relative name with any image suffix
    (`cat.jpg` <- `cat.png`, or `cat.jpg.png` as `reconstruct` names it beside a `cat.png`);
    a missing, extra or ambiguous name is one line (exit 2)."""
    if not folder.is_dir():
        raise UsageError(f"--reconstructions {folder}: not a folder")
    found, problems = list_images([folder])
    if problems:
        raise UsageError(f"--reconstructions {folder}: {problems[0].path}: {problems[0].reason}")
    by_name: dict[str, list[Path]] = {}
    for _, path in found:
        key = path.relative_to(folder).with_suffix("").as_posix()
        by_name.setdefault(key, []).append(path)
    clash = next((paths for paths in by_name.values() if len(paths) > 1), None)
    if clash is not None:
        raise UsageError(
            f"--reconstructions {folder}: {' and '.join(map(str, clash))} are the same image "
            "under two suffixes; keep one"
        )
    matched: list[Path] = []
    missing: list[str] = []
    for file in files:
        name = Path(file.name)
        key = name.as_posix() if name.as_posix() in by_name else name.with_suffix("").as_posix()
        if key in by_name:
            matched.append(by_name.pop(key)[0])
        else:
            missing.append(file.name)
    if missing:
        raise UsageError(
            f"--reconstructions {folder}: no reconstruction of {first_and_more(missing)} "
            f"({len(missing)} of {len(files)} images); names are matched by relative path, "
            "suffix aside"
        )
    if by_name:
        extra = sorted(str(paths[0].relative_to(folder)) for paths in by_name.values())
        raise UsageError(
            f"--reconstructions {folder}: {first_and_more(extra)} match no input image; "
            "give the same images as the reconstructions were made from"
        )
    return matched


def evaluate_reconstructions(
    files: list[InputFile],
    reconstructions: list[Path],
    settings: EvalSettings,
    scores: Scores,
    device: torch.device,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress = no_progress,
) -> Evaluation:
    """Measure given reconstructions (reconstructions[i] of files[i]) against their originals,
    both cut to --size the same way where it is given."""
    buckets = Buckets([tuple(settings.size)]) if settings.size is not None else None
    failures: dict[int, Failure] = {}

    def read(index: int) -> np.ndarray | Failure:
        try:
            return read_image(reconstructions[index], 3, fit=buckets)
        except ImageReadError as exc:
            return Failure(str(files[index].path), f"its reconstruction {exc.path}: {exc.reason}")

    def pairs() -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        for batch in load_batches(
            files,
            3,
            None,
            batch_size,
            workers,
            failures=failures,
            progress=progress,
            original_sizes=True,
            pin_memory=device.type == "cuda",
            buckets=buckets,
        ):
            keep, recons = [], []
            read_back = decode_all(read, batch.indices)
            for j, (index, recon) in enumerate(zip(batch.indices, read_back, strict=True)):
                shape = tuple(batch.images.shape[2:])
                if not isinstance(recon, Failure) and recon.shape[:2] != shape:
                    recon = Failure(
                        str(files[index].path),
                        f"its reconstruction {reconstructions[index]} is "
                        f"{recon.shape[0]}x{recon.shape[1]}, the image {shape[0]}x{shape[1]}",
                    )
                if isinstance(recon, Failure):
                    failures[index] = recon
                    progress(1)
                else:
                    keep.append(j)
                    recons.append(image_tensor(recon))
            if keep:
                originals = batch.images[keep].to(device)
                yield [batch.indices[j] for j in keep], originals, torch.stack(recons).to(device)

    return _measure(pairs(), files, failures, scores, device, progress)


def _measure(pairs, files, failures, scores: Scores, device, progress) -> Evaluation:
    """Every pair's scores, the overall means and rFID, the time and the peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    rows: dict[int, dict] = {}
    sizes: set[tuple[int, int]] = set()
    for indices, originals, reconstructions in pairs:
        values = scores.update(originals, reconstructions)
        sizes.add(tuple(originals.shape[-2:]))
        for j, index in enumerate(indices):
            rows[index] = {"file": str(files[index].path), **{k: v[j] for k, v in values.items()}}
        progress(len(indices))
    ordered = [rows[i] for i in sorted(rows)]
    metrics = {}
    if ordered:
        for name in ordered[0]:
            if name != "file":
                metrics[name] = float(np.mean([row[name] for row in ordered], dtype=np.float64))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if scores.fid is not None:
        if len(ordered) < 2:
            raise UsageError(f"rFID needs at least 2 images; {len(ordered)} could be measured")
        metrics["rfid"] = scores.rfid()
    fid_seconds = time.perf_counter() - start - seconds
    peak, measure = peak_memory(device)
    failed = [failures[i] for i in sorted(failures)]
    return Evaluation(ordered, failed, metrics, sizes, seconds, peak, measure, fid_seconds)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation since the evaluation began on a GPU;
    on the CPU the process's peak resident memory (getrusage: since the process began)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kibibytes on Linux, in bytes on macOS
    return (peak if sys.platform == "darwin" else peak * 1024), "the process's peak RSS"


def declared_settings(
    settings: EvalSettings,
    networks: dict,
    *,
    predictor: Predictor | None,
    reconstructions: Path | None,
) -> dict:
    """Every setting a figure depends on, named, for --json and the summary."""
    if settings.size is not None:
        h, w = settings.size
        resize = f"shorter side resized (bicubic) and centre-cropped to {h}x{w}"
    elif predictor is not None and not predictor.fully_convolutional:
        resize = "stretched (bicubic) to the model's input {}x{}".format(*predictor.size)
    else:
        resize = "none: each image at its own size"
    if predictor is None:
        decoded = None
    elif not predictor.variational:
        decoded = "latent (the model is deterministic)"
    else:
        decoded = "sample" if settings.sample else "mean"
    return {
        "reconstructions": str(reconstructions) if reconstructions else "made by aecli",
        "posterior": decoded,
        "seed": settings.seed if settings.sample else None,
        "precision": None if predictor is None else predictor.execution.describe(),
        "resize": resize,
        "psnr": "mean over images of 10 log10(255^2 / MSE) on 8-bit values "
        f"(an exact copy counts {PSNR_CAP_DB:g} dB)",
        "ssim": "torchmetrics' definition: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, "
        "data range 255, reflected borders; mean over images",
        **networks,
        "versions": {
            "aecli": _version("aecli"),
            "torch": torch.__version__,
        },
    }


def comparable_line(evaluation: Evaluation, settings: dict) -> str:
    """The figures and the settings they hold under, in one line: what to put beside a
    published table's row."""
    metrics = evaluation.metrics
    figures = []
    if "rfid" in metrics:
        figures.append(f"rFID {metrics['rfid']:.2f}")
    if "psnr" in metrics:
        figures.append(f"PSNR {metrics['psnr']:.2f} dB")
    if "ssim" in metrics:
        figures.append(f"SSIM {metrics['ssim']:.4f}")
    if "lpips" in metrics:
        figures.append(f"LPIPS-{settings['lpips']['net']} {metrics['lpips']:.4f}")
    how = [f"{len(evaluation.rows)} images", evaluation.image_size]
    if settings["posterior"] in ("mean", "sample"):
        how.append(f"posterior {settings['posterior']}")
    if settings["precision"]:
        how.append(settings["precision"])
    if settings["rfid"]:
        how.append("rFID: torch-fidelity Inception via torchmetrics, 2048 features")
    return " / ".join(figures) + " (" + ", ".join(how) + ")"


def fid_count_note(count: int) -> str | None:
    """A note where rFID rests on fewer images than features (a covariance short of full
    rank: the figure depends strongly on the count, and no published table uses so few)."""
    if count >= FID_FULL_RANK:
        return None
    return (
        f"rFID over {count} images: fewer than {FID_FULL_RANK} leave the 2048-feature "
        "covariance short of full rank, and the figure grows as the count shrinks; published "
        "tables use 5,000 (COCO 2017 val) or 50,000 (ImageNet val)"
    )


__all__ = [
    "LPIPS_NETS",
    "EvalSettings",
    "Evaluation",
    "Scores",
    "comparable_line",
    "declared_settings",
    "evaluate_model",
    "evaluate_reconstructions",
    "fid_count_note",
    "load_scores",
    "match_reconstructions",
]

"""Generation in the latent space: drawing new latents (`aecli sample`) and paths between two
latents (`aecli interpolate`).

A VAE samples from its prior N(0, I), or, where it has diffusion scaling factors (Stable
Diffusion's, FLUX's), from N(shift, scale^-2 I), the spread those factors assume. A plain
autoencoder has no prior, so it samples from the Gaussian fitted to its training latents at the
end of training (`aecli.stats`, stored in the weights file); `--class` uses one class's
Gaussian, for a VAE as well. Spatial latents are sampled position by position over their
channels, which is how their statistics are stored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aecli.data.images import ImageReadError, fit_image, read_image
from aecli.devices import available_memory
from aecli.errors import UsageError
from aecli.inference import Predictor, decoded_images, image_tensor
from aecli.io.images import compose_sheet
from aecli.io.latent_folder import LatentFolder, is_latent_folder
from aecli.io.latents import STDIO, LatentFile, read_latents

# -- sampling --------------------------------------------------------------------------------


@dataclass
class Gaussian:
    """N(mean, factor @ factor.T) over the latent's dimensions (its channels when spatial)."""

    mean: torch.Tensor  # (D,) float64
    factor: torch.Tensor | None  # (D, D) float64; None for the identity
    description: str

    @classmethod
    def from_covariance(cls, mean: torch.Tensor, cov: torch.Tensor, description: str) -> Gaussian:
        """Factor the covariance by its symmetric square root (eigendecomposition). Unlike
        Cholesky this works for a singular covariance (e.g. a ReLU latent that is always 0),
        whose eigenvalues rounding may push just below zero; those are clamped to 0."""
        values, vectors = torch.linalg.eigh(cov.double())
        factor = vectors * values.clamp_min(0).sqrt() @ vectors.T
        return cls(mean.double(), factor, description)

    def draw(self, noise: torch.Tensor, temperature: float) -> torch.Tensor:
        """Standard normal noise (..., D) -> samples (..., D); temperature scales the spread."""
        spread = noise.double() if self.factor is None else noise.double() @ self.factor.T
        return self.mean + temperature * spread


def resolve_class(given: str, class_names: list[str] | None) -> int:
    """A class name, or an index into the class names; exit 2 naming the known ones if neither."""
    names = class_names or []
    if given in names:
        return names.index(given)
    if re.fullmatch(r"\d+", given) and int(given) < len(names):
        return int(given)
    if not names:
        raise UsageError(
            f"--class {given}: this model's training data had no labels, so it has no classes; "
            "sample without --class"
        )
    known = ", ".join(f"{name} ({i})" for i, name in enumerate(names))
    raise UsageError(f"--class {given}: not a class of this model; known classes: {known}")


def prior(predictor: Predictor, class_index: int | None = None) -> Gaussian:
    """The distribution `sample` draws from (see the module docstring)."""
    stats = predictor.info.latent_stats or {}
    dim = predictor.latent_shape[0]
    if class_index is None and predictor.variational:
        scaling = predictor.scaling
        if not scaling.identity:
            # the latents' spread that the diffusion scaling factors assume (SD, FLUX: a VAE
            # trained with a tiny KL weight, whose posterior is far from N(0, I))
            mean, scale = scaling.channel_factors(dim)
            if not scaling.per_channel:
                what = f"N({scaling.shift:g}, {1 / scaling.scale:.4g}^2 I) (its scaling)"
            else:
                what = "N(shift, 1 / scale^2) per channel (its scaling)"
            return Gaussian(mean, torch.diag(1 / scale), what)
        return Gaussian(torch.zeros(dim, dtype=torch.float64), None, "the VAE prior N(0, I)")
    if "mean" not in stats and predictor.family is not None and predictor.family.deterministic:
        raise UsageError(
            f"{predictor.kind} is deterministic and has no prior to sample from: sample with "
            "the VAE whose latents it decodes (--latents-out) and decode them here with --force",
            path=predictor.name,
        )
    if "mean" not in stats:
        raise UsageError(
            "holds no latent statistics to sample from (they are computed when training "
            "finishes; this weights file was saved before that)",
            path=predictor.name,
        )
    if class_index is None:
        count = int(stats["count"])
        return Gaussian.from_covariance(
            stats["mean"], stats["cov"], f"a Gaussian fitted to {count:,} training latents"
        )
    if "class_mean" not in stats:
        raise UsageError(
            "holds no per-class latent statistics (its training data had no labels)",
            path=predictor.name,
        )
    name = predictor.info.class_names[class_index]
    count = int(stats["class_count"][class_index])
    if count == 0:
        raise UsageError(f"--class {name}: no training image had this class, nothing to sample")
    mean = stats["class_mean"][class_index].double()
    if "class_cov" in stats:
        cov = stats["class_cov"][class_index]
    else:  # too many classes to store each covariance: the pooled within-class one
        cov = _within_class_covariance(stats)
    return Gaussian.from_covariance(
        mean, cov, f"a Gaussian fitted to the {count:,} training latents of class {name}"
    )


def _within_class_covariance(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Total covariance minus the spread of the class means around the mean (both with the
    same n - 1 denominator): the covariance of each latent around its own class's mean."""
    n = stats["count"].double()
    counts = stats["class_count"].double()
    offsets = stats["class_mean"].double() - stats["mean"].double()  # (K, D)
    between = (offsets * counts[:, None]).T @ offsets / (n - 1).clamp_min(1)
    return stats["cov"].double() - between


def latent_shape_at(predictor: Predictor, size: tuple[int, int] | None) -> tuple[int, ...]:
    """The latent shape for images of `size` (spatial latents; None: the training size)."""
    if size is None or size == predictor.size:
        return predictor.latent_shape
    if not predictor.spatial:
        raise UsageError(
            f"--size: this model has a vector latent; its images are always {predictor.accepts}"
        )
    if not predictor.fully_convolutional:
        raise UsageError(f"--size: this model has fixed-size layers; it makes {predictor.accepts}")
    h, w = size
    if h % predictor.factor or w % predictor.factor:
        raise UsageError(
            f"--size {h}x{w}: must be a multiple of the model's downsampling factor "
            f"{predictor.factor} on each side"
        )
    return (predictor.latent_shape[0], h // predictor.factor, w // predictor.factor)


def sample_latents(
    predictor: Predictor,
    count: int,
    *,
    class_index: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> tuple[LatentFile, Gaussian]:
    """`count` latents drawn from the model's prior, as a latent file for this model.

    The noise comes from a CPU generator seeded with `seed`, so the latents are the same on
    every device and every run.
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"--temperature {temperature}: must be a finite number, 0 or more")
    distribution = prior(predictor, class_index)
    shape = latent_shape_at(predictor, size)
    _check_memory(count, shape)
    dim = shape[0]
    generator = torch.Generator().manual_seed(seed)
    if len(shape) == 3:  # (N, H, W, C): one draw over the channels per position
        noise = torch.randn((count, shape[1], shape[2], dim), generator=generator)
        z = distribution.draw(noise, temperature).permute(0, 3, 1, 2)  # (N, C, H, W)
    else:
        z = distribution.draw(torch.randn((count, dim), generator=generator), temperature)
    names = predictor.info.class_names
    if class_index is None:
        labels, prefix = None, "sample"
    else:
        labels = torch.full((count,), class_index, dtype=torch.int64)
        prefix = re.sub(r"[^\w.-]+", "_", names[class_index]) or "class"
    width = max(6, len(str(count - 1)))
    latents = LatentFile(
        z.float().contiguous(),
        labels,
        predictor.fingerprint,
        [f"{prefix}-{i:0{width}d}" for i in range(count)],
        names if class_index is not None else None,
    )
    return latents, distribution


def _check_memory(count: int, shape: tuple[int, ...]) -> None:
    """Refuse a draw whose latents cannot fit in free memory (noise, float64 draw and float32
    result: 20 bytes a number) instead of failing half-way or being killed by the OS."""
    needed = 20 * count * math.prod(shape)
    free = available_memory(torch.device("cpu"))
    if free is not None and needed > free:
        raise UsageError(
            f"-n {count}: {count:,} latents of shape {tuple(shape)} need {needed / 1e9:.1f} GB, "
            f"more than the {free / 1e9:.1f} GB of free memory; sample fewer at a time "
            "(a different --seed for each part)"
        )


# -- interpolation ---------------------------------------------------------------------------


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) a + t b for each t: (T,) -> (T, *a.shape)."""
    t = t.reshape(-1, *([1] * a.ndim)).to(a.dtype)
    return (1 - t) * a + t * b


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, center: torch.Tensor | None = None
) -> torch.Tensor:
    """Spherical interpolation around `center` (the origin by default): the direction moves
    along the great circle from a to b at constant angular speed (slerp: Shoemake 1985; for
    generative models White 2016, arXiv:1609.04468) while the length goes linearly from |a| to
    |b|, so that no point of the path falls into the low-density middle. (T,) -> (T, *a.shape).

    Where a and b are (nearly) parallel or opposite the great circle is undefined: lerp."""
    center = torch.zeros_like(a) if center is None else center.to(a.dtype)
    u, v = (a - center).double().flatten(), (b - center).double().flatten()
    norm_u, norm_v = u.norm(), v.norm()
    if min(norm_u, norm_v) < 1e-12:
        return lerp(a, b, t)
    cos = torch.clamp(u @ v / (norm_u * norm_v), -1.0, 1.0)
    omega = torch.arccos(cos)
    if torch.sin(omega) < 1e-6:
        return lerp(a, b, t)
    t = t.double().reshape(-1, 1)
    direction = (torch.sin((1 - t) * omega) * u / norm_u + torch.sin(t * omega) * v / norm_v) / (
        torch.sin(omega)
    )  # unit length: a point on the great circle through u and v
    length = (1 - t) * norm_u + t * norm_v
    path = (direction * length).reshape(-1, *a.shape).to(a.dtype)
    return path + center


def interpolation_path(
    a: torch.Tensor,
    b: torch.Tensor,
    steps: int,
    mode: str = "lerp",
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """`steps` latents from a to b, both included: (steps, *a.shape)."""
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    path = slerp(a, b, t, center) if mode == "slerp" else lerp(a, b, t)
    # The ends are a and b exactly, whatever the arithmetic did to them.
    path[0], path[-1] = a, b
    return path


def slerp_center(predictor: Predictor) -> torch.Tensor | None:
    """Where slerp turns around: the prior's mean, i.e. the origin for a VAE (the shift for one
    with diffusion scaling factors) and the training latents' mean for a plain autoencoder
    (whose codes need not surround the origin)."""
    stats = predictor.info.latent_stats or {}
    if predictor.variational:
        if predictor.scaling.shift in (0.0, (0.0,)):
            return None
        mean = predictor.scaling.channel_factors(predictor.latent_shape[0])[0].float()
    elif "mean" not in stats:
        return None
    else:
        mean = stats["mean"].float()
    return mean[:, None, None] if predictor.spatial else mean


def endpoint(predictor: Predictor, source: str, *, force: bool = False) -> tuple[torch.Tensor, str]:
    """One end of an interpolation: an image (encoded at the model's input size; the posterior
    mean for a VAE), a latent file holding one latent, or one latent of a latent folder
    (`DIR#NAME` or `DIR#NUMBER`; `DIR` when it holds one). -> (latent (1, ...), what it was);
    recorded scaling undone."""
    reference = folder_reference(source)
    if reference is not None:
        folder = LatentFolder.open(reference[0])
        if reference[1] is None and folder.count != 1:
            raise UsageError(
                f"holds {folder.count} latents; pick one as {source}#NAME or {source}#NUMBER",
                path=folder.name,
            )
        number = 0 if reference[1] is None else folder.locate(reference[1], source)
        latents = folder.select([number])
    elif source == STDIO or Path(source).suffix.lower() in (".safetensors", ".npy"):
        latents = read_latents(source)
    else:
        latents = None
    if latents is not None:
        z = predictor.fit(latents, force=force, scaling=latents.scaling)
        if len(z) != 1:
            raise UsageError(
                f"holds {len(z)} latents; interpolate needs one at each end (encode a single "
                "image, or sample with -n 1)",
                path=latents.name,
            )
        return z, "latent"
    try:
        array = read_image(Path(source), predictor.channels)
    except ImageReadError as exc:
        raise UsageError(
            f"{exc.reason} (give an image, or a latent file ending in .safetensors or .npy)",
            path=source,
        ) from None
    image = image_tensor(fit_image(array, predictor.size, "stretch"))
    return predictor.encode(image[None]).cpu(), "image"


def folder_reference(source: str) -> tuple[Path, str | None] | None:
    """(folder, selector or None) where `source` names a latent folder or `FOLDER#SELECTOR`
    (a path that exists as a file is that file, whatever its name)."""
    if source == STDIO or Path(source).is_file():
        return None
    if is_latent_folder(source):
        return Path(source), None
    folder, mark, selector = source.rpartition("#")
    if mark and folder and is_latent_folder(folder):
        return Path(folder), selector
    return None


# -- the run's preview -----------------------------------------------------------------------


def preview_sheets(
    predictor: Predictor, ends: torch.Tensor, *, count: int = 16, steps: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """What a run directory shows of a trained model's latent space: `count` samples (as
    `aecli sample -n count --seed seed`) and the slerp from the first image of `ends` (uint8
    (N, C, H, W) at the model's input size) to the second (as `aecli interpolate`), as uint8
    (H, W, C) sheets; no strip with fewer than two images."""
    latents, _ = sample_latents(predictor, count, seed=seed)
    images = list(decoded_images(predictor, latents.latents))
    columns = 8 if count > 8 else count
    samples = compose_sheet([images[i : i + columns] for i in range(0, count, columns)])
    if len(ends) < 2:
        return samples, None
    z = predictor.encode(ends[:2]).cpu()
    path = interpolation_path(z[0], z[1], steps, "slerp", slerp_center(predictor))
    return samples, compose_sheet([list(decoded_images(predictor, path))])

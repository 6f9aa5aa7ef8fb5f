"""Latent statistics: mean and covariance of a model's training latents, for `aecli sample`; and
per-channel mean and spread of a latent folder's latents, for `aecli stats` and `aecli export
--latent-stats`.

For a vector latent the statistics are over the D latent dimensions; for a spatial latent over
its C channels, with every position of every image a sample. Per class too where data had labels
(per-class covariances only while they stay small: classes x D x D <= 2**24 numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from aecli.errors import UsageError
from aecli.io.latents import LatentFileError, LatentScaling
from aecli.models import Autoencoder

if TYPE_CHECKING:
    from aecli.io.latent_folder import LatentFolder

MAX_CLASS_COVARIANCE = 2**24


@torch.inference_mode()
def latent_statistics(
    model: Autoencoder,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    num_classes: int,
    reduce: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda t: t,
) -> dict[str, torch.Tensor]:
    """Sums over the posterior means of `batches` ((model input, labels or None) each),
    reduced (over the ranks), then moments."""
    model.eval()
    spatial = len(model.latent_shape) == 3
    dim = model.latent_shape[0]
    device = next(model.parameters()).device
    with_classes = num_classes > 0
    class_cov = with_classes and num_classes * dim * dim <= MAX_CLASS_COVARIANCE
    sums = {
        "count": torch.zeros((), dtype=torch.float64, device=device),
        "sum": torch.zeros(dim, dtype=torch.float64, device=device),
        "outer": torch.zeros(dim, dim, dtype=torch.float64, device=device),
    }
    if with_classes:
        sums["class_count"] = torch.zeros(num_classes, dtype=torch.float64, device=device)
        sums["class_sum"] = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        if class_cov:
            sums["class_outer"] = torch.zeros(
                num_classes, dim, dim, dtype=torch.float64, device=device
            )
    for x, labels in batches:
        z = model.encode(x.float()).mode().double()
        if spatial:  # (B, C, H, W) -> (B*H*W, C), one sample per position
            positions = z.shape[2] * z.shape[3]
            z = z.permute(0, 2, 3, 1).reshape(-1, dim)
        else:
            positions = 1
        sums["count"] += z.shape[0]
        sums["sum"] += z.sum(0)
        sums["outer"] += z.T @ z
        if with_classes:
            y = labels.to(device).repeat_interleave(positions)
            sums["class_count"].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
            sums["class_sum"].index_add_(0, y, z)
            if class_cov:
                sums["class_outer"].index_add_(0, y, z[:, :, None] * z[:, None, :])
    sums = reduce(sums)
    stats = {"count": sums["count"]}
    stats["mean"], stats["cov"] = _moments(sums["count"], sums["sum"], sums["outer"])
    if with_classes:
        count = sums["class_count"].clamp_min(1)
        stats["class_count"] = sums["class_count"]
        stats["class_mean"] = sums["class_sum"] / count[:, None]
        if class_cov:
            stats["class_cov"] = torch.stack(
                [
                    _moments(sums["class_count"][k], sums["class_sum"][k], sums["class_outer"][k])[
                        1
                    ]
                    for k in range(num_classes)
                ]
            )
    return {k: v.float().cpu() for k, v in stats.items()}


def _moments(count, total, outer) -> tuple[torch.Tensor, torch.Tensor]:
    n = count.clamp_min(1)
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1).clamp_min(1)
    return mean, (cov + cov.T) / 2


# -- a latent folder's statistics ------------------------------------------------------------

CHUNK_VALUES = 1 << 22  # latent values taken to float64 at a time (32 MiB), whatever the shard


class Moments:
    """Count, mean and sum of squared deviations of values per channel (`full`: the sums of
    products of deviations of every pair of channels), float64, merged chunk by chunk with
    Chan, Golub and LeVeque's pairwise formula ("Updating formulae and a pairwise algorithm for
    computing sample variances", 1979): each chunk's deviations are from its own mean, so that
    no digits cancel however far the latents' mean lies from 0, where a sum of squares minus
    n mean^2 loses a factor (mean / std)^2 of float64's precision."""

    def __init__(self, channels: int, full: bool = False):
        self.full = full
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        shape = (channels, channels) if full else (channels,)
        self.deviations = torch.zeros(shape, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        """A chunk of values (C, R) float64: R samples of C channels."""
        count = values.shape[1]
        if count == 0:
            return
        mean = values.mean(1)
        centred = values - mean[:, None]
        squares = centred @ centred.T if self.full else centred.square().sum(1)
        total = self.count + count
        delta = mean - self.mean
        between = torch.outer(delta, delta) if self.full else delta.square()
        self.deviations += squares + between * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        """Per channel, over all the values (numpy's default, ddof=0)."""
        squares = self.deviations.diagonal() if self.full else self.deviations
        return squares / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """(C, C) with the n - 1 of `latent_statistics` (whose `cov` aecli sample reads)."""
        return self.deviations / max(self.count - 1, 1)


def folder_statistics(
    folder: LatentFolder,
    *,
    flip: bool = False,
    patch: int = 1,
    unscale: bool = False,
    covariance: bool = False,
    class_names: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-channel mean and standard deviation of every latent of a latent folder, read shard by
    shard (memory bounded by a shard and CHUNK_VALUES); spatial latents (C, H, W): per channel
    over all images and positions; vector latents (D,): per dimension. `flip`: the mirror
    images' latents (latents_flip) count too; `patch`: per channel of the latents in patch x
    patch squares (C p^2 channels, in the order of FLUX.2's `_patchify_latents`, as
    `LatentScaling`); `unscale`: the folder's recorded scaling undone first (the model's raw
    latents); `covariance`: also what `aecli sample` reads (`latent_statistics`' cov and, where
    every latent has a label of one of `class_names`, class_count, class_mean and class_cov);
    `progress(latents)` after each shard.

    -> float64 tensors: `images` (latents counted), `values` (per channel), `mean` and `std`
    (C,), and over all channels, what one scaling factor uses, `overall_mean`, `overall_std`
    and `overall_rms` (the root mean square). Where the folder stores the posterior's std
    (latents_std: `encode --store moments`), `draw_std` and `overall_draw_std`: the spread of
    draws from the posterior, sqrt(var(mean) + mean(std^2)), what a trainer that samples every
    epoch sees; `std` is then that of the posterior means. Standard deviations are over all
    the values (ddof=0)."""
    scaling = folder.scaling if unscale else None
    _check_shapes(folder, scaling, patch)
    if flip and not folder.settings.get("flip"):
        raise UsageError(
            f"--flip: {folder.name} holds no mirror images' latents (`aecli encode --flip` "
            "stores them)"
        )
    moments: Moments | None = None
    spread: torch.Tensor | None = None  # the sum of latents_std^2 per channel, where stored
    classes: dict[int, Moments] = {}
    labelled = covariance and bool(class_names)
    images = 0
    for latents in folder:
        parts = [(latents.latents, latents.std)]
        if flip:
            if latents.flip is None:
                raise LatentFileError(
                    "holds no latents_flip, the index says it does", path=latents.name
                )
            parts.append((latents.flip, latents.flip_std))
        labels = _labels_of(latents, class_names) if labelled else None
        labelled = labels is not None
        rows = max(1, CHUNK_VALUES // max(1, math.prod(latents.latents.shape[1:])))
        for z, std in parts:
            if (std is None) != (spread is None) and moments is not None:
                raise LatentFileError(
                    "holds latents_std where other shards have none, or none where they have",
                    path=latents.name,
                )
            for start in range(0, len(z), rows):
                values = _channel_values(z[start : start + rows], scaling, patch)
                if moments is None:
                    moments = Moments(values.shape[0], full=covariance)
                    spread = (
                        None if std is None else torch.zeros(values.shape[0], dtype=torch.float64)
                    )
                moments.add(values)
                if std is not None:
                    spreads = _channel_values(std[start : start + rows], _spread_of(scaling), patch)
                    spread += spreads.square().sum(1)
                if labelled:
                    _add_classes(classes, values, labels[start : start + rows], len(class_names))
            images += len(z)
        if progress is not None:
            progress(len(latents))
    assert moments is not None  # LatentFolder.open refuses a folder without latents
    stats = {"images": torch.tensor(float(images), dtype=torch.float64)}
    stats["values"] = torch.tensor(float(moments.count), dtype=torch.float64)
    variance = moments.variance()
    stats["mean"], stats["std"] = moments.mean, variance.sqrt()
    overall_mean = moments.mean.mean()
    overall_variance = (variance + (moments.mean - overall_mean).square()).mean()
    stats["overall_mean"] = overall_mean
    stats["overall_std"] = overall_variance.sqrt()
    stats["overall_rms"] = (overall_variance + overall_mean.square()).sqrt()
    if spread is not None:  # the law of total variance: var(draw) = var(mean) + E[std^2]
        posterior = spread / moments.count
        stats["draw_std"] = (variance + posterior).sqrt()
        stats["overall_draw_std"] = (overall_variance + posterior.mean()).sqrt()
    if covariance:
        stats["cov"] = moments.covariance()
        if labelled:
            stats.update(_class_statistics(classes, len(class_names), moments.mean.shape[0]))
    return stats


def sample_statistics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `aecli sample` reads from a weights file (`latent_statistics`' keys, float32), from
    `folder_statistics(..., covariance=True)`."""
    found = {"count": stats["values"], "mean": stats["mean"], "cov": stats["cov"]}
    found.update({k: v for k, v in stats.items() if k.startswith("class_")})
    return {k: v.float() for k, v in found.items()}


def unscaled_shape(shape: tuple[int, ...], scaling: LatentScaling | None) -> tuple[int, ...]:
    """The shape of latents of `shape` with their scaling undone (its patches put back)."""
    p = 1 if scaling is None else scaling.patch
    return shape if p == 1 else (shape[0] // p**2, shape[1] * p, shape[2] * p)


def _check_shapes(folder: LatentFolder, scaling: LatentScaling | None, patch: int) -> None:
    """Every latent shape splits into patch x patch squares (after the scaling is undone)."""
    for shape in folder.shapes:
        shape = unscaled_shape(shape, scaling)
        if patch > 1 and (len(shape) != 3 or shape[1] % patch or shape[2] % patch):
            raise LatentFileError(
                f"holds latents of {'x'.join(map(str, shape))}, which do not split into the "
                f"{patch}x{patch} patches whose statistics are asked for",
                path=folder.name,
            )


def _channel_values(z: torch.Tensor, scaling: LatentScaling | None, patch: int) -> torch.Tensor:
    """Latents (N, C, H, W) or (N, D) as float64 values per channel (C, N H W) or (D, N): the
    recorded scaling undone, then in patches."""
    z = z.double()
    if scaling is not None:
        z = scaling.undo(z)
    if patch > 1:
        z = LatentScaling(1.0, 0.0, patch).apply(z)  # (N, C p^2, H/p, W/p)
    return z.transpose(0, 1).reshape(z.shape[1], -1)


def _spread_of(scaling: LatentScaling | None) -> LatentScaling | None:
    """The scaling as it applies to a standard deviation: no shift (scales are positive)."""
    return None if scaling is None else replace(scaling, shift=0.0)


def _labels_of(latents, class_names: list[str]) -> torch.Tensor | None:
    """A shard's labels as numbers of `class_names` (by name); None where it has none, or a
    class that is not one of them."""
    names, labels = latents.class_names or [], latents.labels
    if labels is None or not names or not set(names) <= set(class_names):
        return None
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(names):
        return None
    return torch.tensor([class_names.index(n) for n in names])[labels]


def _add_classes(classes: dict[int, Moments], values, labels: torch.Tensor, count: int) -> None:
    """A chunk's values (C, N P) to the moments of their images' classes (P values each)."""
    channels = values.shape[0]
    per_image = values.shape[1] // max(len(labels), 1)
    columns = labels.repeat_interleave(per_image)
    full = count * channels * channels <= MAX_CLASS_COVARIANCE
    for label in columns.unique().tolist():
        if label not in classes:
            classes[label] = Moments(channels, full=full)
        classes[label].add(values[:, columns == label])


def _class_statistics(classes: dict[int, Moments], count: int, channels: int) -> dict:
    empty = Moments(channels, full=count * channels * channels <= MAX_CLASS_COVARIANCE)
    every = [classes.get(k, empty) for k in range(count)]
    found = {
        "class_count": torch.tensor([float(m.count) for m in every], dtype=torch.float64),
        "class_mean": torch.stack([m.mean for m in every]),
    }
    if empty.full:
        found["class_cov"] = torch.stack([m.covariance() for m in every])
    return found

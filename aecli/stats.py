"""Latent statistics for `aecli sample`: mean and covariance of the training latents.

For a vector latent the statistics are over the D latent dimensions; for a spatial latent over
its C channels, with every position of every image a sample. Per class too where data had labels
(per-class covariances only while they stay small: classes x D x D <= 2**24 numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from aecli.models import Autoencoder

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

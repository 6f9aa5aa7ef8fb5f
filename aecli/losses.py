"""Training losses. `compute_loss` returns named terms; each becomes a metrics.jsonl field."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aecli.config import LossConfig
from aecli.models.autoencoder import AutoencoderOutput


def reconstruction_loss(
    out: AutoencoderOutput, target: torch.Tensor, kind: str, reduction: str
) -> torch.Tensor:
    """Per-element loss reduced as configured: mean over everything, or sum per image."""
    if kind == "bce":  # on logits: stable, and exact for a sigmoid output
        per_element = F.binary_cross_entropy_with_logits(out.raw.float(), target, reduction="none")
    elif kind == "mse":
        per_element = (out.image.float() - target).pow(2)
    else:
        per_element = (out.image.float() - target).abs()
    if reduction == "sum":
        return per_element.flatten(1).sum(dim=1).mean()
    return per_element.mean()


def compute_loss(
    out: AutoencoderOutput, target: torch.Tensor, config: LossConfig, variational: bool
) -> dict[str, torch.Tensor]:
    """{'loss': weighted total, '<reconstruction kind>': term, 'kl': term (VAEs)}."""
    terms = {
        config.reconstruction: reconstruction_loss(
            out, target, config.reconstruction, config.reduction
        )
    }
    total = terms[config.reconstruction]
    if variational:
        terms["kl"] = out.posterior.kl().float().mean()
        total = total + config.kl_weight * terms["kl"]
    return {"loss": total, **terms}


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, for images in [0, 1]: shape (B,)."""
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))

"""Training losses. `compute_loss` returns named terms; each becomes a metrics.jsonl field."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aecli.config import LossConfig
from aecli.data.transforms import to_unit
from aecli.models.autoencoder import AutoencoderOutput

# MS-SSIM's standard scale weights (Wang et al. 2003)
_MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# Each reconstruction loss as one fused operation with its own backward: written out as
# (x - y).pow(2).mean(), MSE ran 24 operations in forward and backward where F.mse_loss runs 18,
# and took 3 to 4 times as long on the CPU (see CHANGELOG.md).
_RECONSTRUCTION = {
    "bce": F.binary_cross_entropy_with_logits,  # on logits: stable, and exact for a sigmoid output
    "mse": F.mse_loss,
    "l1": F.l1_loss,
}


def reconstruction_loss(
    out: AutoencoderOutput, target: torch.Tensor, kind: str, reduction: str
) -> torch.Tensor:
    """Per-element loss reduced as configured: mean over everything, or sum per image."""
    prediction = (out.raw if kind == "bce" else out.image).float()
    if reduction == "sum":  # the batch's sum over the batch size: the mean of per-image sums
        return _RECONSTRUCTION[kind](prediction, target, reduction="sum") / len(target)
    return _RECONSTRUCTION[kind](prediction, target)


def ssim(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "elementwise_mean"):
    """SSIM of images in [0, 1] (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01,
    K2 0.03; borders reflected, as torchmetrics does). `reduction` "none" gives one value per image.

    Written out here (it equals torchmetrics' to float precision, see the tests) because
    importing torchmetrics costs every command that reports SSIM over two seconds.
    """
    x, y = prediction.float(), target.float()
    channels, pad = x.shape[1], 5
    coords = torch.arange(11, dtype=torch.float32, device=x.device) - pad
    gauss = torch.exp(-0.5 * (coords / 1.5) ** 2)
    gauss = gauss / gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).expand(channels, 1, 11, 11).contiguous()
    inputs = torch.cat([x, y, x * x, y * y, x * y])
    moments = F.conv2d(reflect_pad(inputs, pad), kernel, groups=channels)
    mu_x, mu_y, xx, yy, xy = moments.split(x.shape[0])
    var_x = (xx - mu_x**2).clamp_min(0)
    var_y = (yy - mu_y**2).clamp_min(0)
    cov = xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    per_image = index.flatten(1).mean(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """`F.pad(x, (pad,) * 4, mode="reflect")` (replicate for sides of `pad` pixels or fewer,
    which reflection cannot pad), as gathers: their backward is deterministic on CUDA, where
    the reflection padding's backward has no deterministic kernel (train.deterministic)."""
    if min(x.shape[-2:]) <= pad:
        return F.pad(x, (pad,) * 4, mode="replicate")
    for dim in (-2, -1):
        n = x.shape[dim]
        index = torch.arange(-pad, n + pad, device=x.device).abs()
        index = torch.where(index >= n, 2 * (n - 1) - index, index)
        x = x.index_select(dim, index)
    return x


def ms_ssim(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of images in [0, 1], with as many of the five scales as the image size allows."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    side = min(prediction.shape[-2:])
    scales = max(1, min(5, int(math.log2(max(side - 1, 1) / 10)) + 1))
    while scales > 1 and side <= 10 * 2 ** (scales - 1):
        scales -= 1
    betas = _MS_SSIM_BETAS[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    return multiscale_structural_similarity_index_measure(
        prediction.float(), target.float(), data_range=1.0, betas=betas, normalize="relu"
    )


def compute_loss(
    out: AutoencoderOutput,
    target: torch.Tensor,
    config: LossConfig,
    variational: bool,
    *,
    value_range: str = "unit",
    step: int | None = None,
    perceptual: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """{'loss': weighted total, '<reconstruction>': term, 'perceptual', 'kl', 'ssim', 'ms_ssim'
    as configured}.

    `step` (training) ramps the KL weight over `kl_warmup_steps`; None (validation) uses the
    full weight so that validation losses are comparable across epochs. `perceptual` is the
    LPIPS network (aecli.perceptual) when `perceptual_weight` is set. Latent diffusion adds
    LPIPS to every pixel's reconstruction loss, so with `reduction: sum` its weight counts once
    per value of the image, as there.
    """
    kind = config.reconstruction
    terms = {kind: reconstruction_loss(out, target, kind, config.reduction)}
    if perceptual is not None and config.perceptual_weight:
        terms["perceptual"] = lpips_distance(perceptual, out.image, target, value_range)
    total = reconstruction_part(terms, config, target)
    if variational:
        terms["kl"] = out.posterior.kl().float().mean()
        weight = config.kl_weight
        if step is not None and config.kl_warmup_steps:
            weight *= min(1.0, step / config.kl_warmup_steps)
        total = total + weight * terms["kl"]
    if config.ssim_weight or config.ms_ssim_weight:
        prediction, reference = (
            to_unit(out.image.float(), value_range),
            to_unit(target, value_range),
        )
        if config.ssim_weight:
            terms["ssim"] = 1.0 - ssim(prediction, reference)
            total = total + config.ssim_weight * terms["ssim"]
        if config.ms_ssim_weight:
            terms["ms_ssim"] = 1.0 - ms_ssim(prediction, reference)
            total = total + config.ms_ssim_weight * terms["ms_ssim"]
    return {"loss": total, **terms}


def reconstruction_part(
    terms: dict[str, torch.Tensor], config: LossConfig, target: torch.Tensor
) -> torch.Tensor:
    """The reconstruction term plus LPIPS as the total weighs it (once per image value with
    `reduction: sum`): latent diffusion's NLL, which the adaptive GAN weight balances."""
    value = terms[config.reconstruction]
    if "perceptual" in terms:
        per_image = target[0].numel() if config.reduction == "sum" else 1
        value = value + config.perceptual_weight * per_image * terms["perceptual"]
    return value


def lpips_distance(
    network: nn.Module, prediction: torch.Tensor, target: torch.Tensor, value_range: str
) -> torch.Tensor:
    """Mean LPIPS of a batch; images go to [-1, 1] (not clamped, as latent diffusion feeds its
    reconstructions) and grey ones to three channels."""
    a, b = prediction.float(), target.float()
    if value_range == "unit":
        a, b = 2.0 * a - 1.0, 2.0 * b - 1.0
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    return network(a, b).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (taming-transformers): 0 when real patches score at least
    1 and fakes at most -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float
) -> torch.Tensor:
    """The generator term's weight of latent diffusion's LPIPSWithDiscriminator: the ratio of
    the reconstruction loss's gradient norm to the generator loss's at the decoder's last layer,
    clamped to [0, 1e4], detached, times `disc_weight`."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, for images in [0, 1]: shape (B,)."""
    return psnr_from_mse(mse_per_image(prediction, target))


def mse_per_image(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of a per-image MSE of values in [0, 1] (capped at 100 dB for exact copies)."""
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))

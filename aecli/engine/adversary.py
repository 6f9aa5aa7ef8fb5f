"""The adversarial half of latent diffusion's autoencoder objective (LPIPSWithDiscriminator):
a PatchGAN discriminator with its own optimiser, a hinge loss, and the generator term weighted
adaptively at the decoder's last layer. Before `loss.disc_start` the discriminator neither
trains nor weighs in, and its terms read 0."""

from __future__ import annotations

import torch
from torch import nn

from aecli.config import Config
from aecli.devices import Execution, placed
from aecli.errors import ConfigError
from aecli.losses import adaptive_weight, hinge_d_loss
from aecli.models import Autoencoder
from aecli.models.discriminator import PatchDiscriminator

GENERATOR_TERMS = ("g_loss", "disc_weight")
DISCRIMINATOR_TERMS = ("d_loss", "logits_real", "logits_fake")


def last_layer(model: Autoencoder) -> torch.Tensor:
    """The weight of the decoder's last layer with one (LDM: decoder.conv_out.weight)."""
    weights = [
        m.weight
        for m in model.decoder.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
    ]
    if not weights:
        raise ValueError("the decoder has no convolution or linear layer to weigh the GAN term at")
    return weights[-1]


def patch_grid(size: int, layers: int) -> int:
    """The discriminator's output size along an axis of `size` pixels: 4x4 convolutions with
    padding 1, `layers` of them with stride 2, then two with stride 1."""
    for _ in range(layers):
        size = (size - 2) // 2 + 1
    return size - 2


class Adversary:
    def __init__(self, config: Config, model: Autoencoder, execution: Execution):
        loss, optim = config.loss, config.optim
        side = min(config.data.size)
        if patch_grid(side, loss.disc_layers) < 1:
            raise ConfigError(
                [
                    f"loss.disc_layers {loss.disc_layers}: the discriminator shrinks images of "
                    f"{side} pixels to nothing; use fewer layers"
                ]
            )
        self.start, self.weight = loss.disc_start, loss.disc_weight
        self.last_layer = last_layer(model)
        self.discriminator = PatchDiscriminator(
            config.data.channels, loss.disc_channels, loss.disc_layers
        ).to(placed(execution.device), memory_format=execution.memory_format)
        self.optimizer = torch.optim.Adam(
            self.discriminator.parameters(),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            **execution.optimizer_options(),
        )
        self.execution = execution
        self._zero: torch.Tensor | None = None

    def active(self, step: int) -> bool:
        return step >= self.start

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def generator_terms(
        self, image: torch.Tensor, nll: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor]:
        """g_loss (-mean logit of the reconstructions) and its adaptive weight; the caller adds
        disc_weight * g_loss to the loss."""
        if not self.active(step):
            zero = self._zeros(nll)
            return {"g_loss": zero, "disc_weight": zero}
        # the generator's step needs no gradient for the discriminator (Lightning, which the
        # reference runs on, switches it off the same way)
        self.discriminator.requires_grad_(False)
        with self.execution.autocast():
            g_loss = -self.discriminator(image).float().mean()
        weight = adaptive_weight(nll, g_loss, self.last_layer, self.weight)
        return {"g_loss": g_loss, "disc_weight": weight}

    def train(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One discriminator step on real images and detached reconstructions."""
        if not self.active(step):
            zero = self._zeros(real)
            return {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
        self.discriminator.requires_grad_(True)
        with self.execution.autocast():
            logits_real = self.discriminator(real.detach()).float()
            logits_fake = self.discriminator(fake.detach()).float()
        d_loss = hinge_d_loss(logits_real, logits_fake)
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizer.step()
        return {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }

    def _zeros(self, like: torch.Tensor) -> torch.Tensor:
        if self._zero is None:
            self._zero = torch.zeros((), device=like.device)
        return self._zero

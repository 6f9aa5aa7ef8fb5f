"""The PatchGAN discriminator of latent diffusion's autoencoder loss (taming-transformers'
NLayerDiscriminator, after pix2pix): strided 4x4 convolutions with BatchNorm and LeakyReLU(0.2),
one logit per overlapping patch."""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images -> (B, 1, h, w) logits, one per patch."""

    def __init__(self, channels: int, base: int = 64, layers: int = 3):
        super().__init__()
        parts: list[nn.Module] = [nn.Conv2d(channels, base, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = base
        for n in range(1, layers + 1):
            out = base * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last of the `layers` keeps the size
            parts += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        parts.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*parts)
        for module in self.modules():  # taming's weights_init
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

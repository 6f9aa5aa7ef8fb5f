"""The autoencoder: encoder -> posterior over the latent -> decoder, for every preset."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# one generator for the batch, or one per item
Generators = torch.Generator | list[torch.Generator] | None


class DiagonalGaussian:
    """q(z | x) of a VAE: a diagonal Gaussian from mean and log-variance, held in fp32 whatever
    the encoder ran in: under bf16 autocast (8 bits of mantissa) the KL's exp(logvar) - 1 -
    logvar cancels to a fraction of its value near the prior, and its gradient vanishes for
    |logvar| < 2^-8."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean.float()
        # Same clamp as latent diffusion: keeps exp() finite early in training.
        self.logvar = logvar.float().clamp(-30.0, 20.0)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """A draw from q(z | x): from the global RNG on the mean's device, or from `generator`
        on its own device, one item after another, so that an item's noise depends on the seed
        and its place in the sequence, not on the batch size (the CPU sampler draws a batch in
        blocks of 16 values and redraws the last block for sizes that are not multiples of
        16), nor on the device the model runs on. A list holds one generator per item."""
        if generator is None:
            noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        else:
            shape = self.mean.shape[1:]
            each = generator if isinstance(generator, list) else [generator] * len(self.mean)
            noise = torch.stack(
                [torch.randn(shape, generator=g, device=g.device) for g in each]
            ).to(self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per item, summed over latent dimensions: shape (B,)."""
        terms = self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(dim=1)


class Deterministic:
    """The 'posterior' of a plain autoencoder: a point mass at the code."""

    def __init__(self, z: torch.Tensor):
        self.mean = z

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Generators = None) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])


Posterior = DiagonalGaussian | Deterministic


@dataclass
class AutoencoderOutput:
    posterior: Posterior
    z: torch.Tensor
    raw: torch.Tensor  # decoder output before the output activation (logits for sigmoid)
    image: torch.Tensor  # in the data range


_OUTPUT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": lambda t: t}


class Autoencoder(nn.Module):
    """encode(x) -> posterior; decode(z) -> image. `latent_head` maps encoder features to the
    latent (to mean and log-variance, concatenated on dim 1, for a VAE); `latent_norm` holds
    statistics of the latent (buffers only), or is None."""

    def __init__(
        self,
        encoder: nn.Module,
        latent_head: nn.Module,
        decoder: nn.Module,
        *,
        variational: bool,
        output: str,
        input_shape: tuple[int, int, int],
        latent_shape: tuple[int, ...],
        latent_norm: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder, self.latent_head, self.decoder = encoder, latent_head, decoder
        # running statistics of the patchified latent (config latent.statistics: FLUX.2's
        # BatchNorm), held for the latent convention and never run
        self.latent_norm = latent_norm
        self.variational = variational
        self.output = output
        self.input_shape = input_shape
        self.latent_shape = latent_shape

    def encode(self, x: torch.Tensor) -> Posterior:
        return self.posterior(self.encode_raw(x))

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The latent head's output: the code, or mean and log-variance on dim 1 (VAE)."""
        return self.latent_head(self.encoder(x))

    def posterior(self, h: torch.Tensor) -> Posterior:
        if self.variational:
            mean, logvar = h.chunk(2, dim=1)
            return DiagonalGaussian(mean, logvar)
        return Deterministic(h)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def to_image(self, raw: torch.Tensor) -> torch.Tensor:
        return _OUTPUT[self.output](raw)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.decode_raw(z))

    def forward(
        self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        raw = self.decode_raw(z)
        return AutoencoderOutput(posterior, z, raw, self.to_image(raw))

"""The model core: blocks, the autoencoder and its posterior, and the builder."""

from aecli.models.autoencoder import Autoencoder, AutoencoderOutput, DiagonalGaussian
from aecli.models.builder import ModelSummary, build_model, forward_flops, summarize

__all__ = [
    "Autoencoder",
    "AutoencoderOutput",
    "DiagonalGaussian",
    "ModelSummary",
    "build_model",
    "forward_flops",
    "summarize",
]

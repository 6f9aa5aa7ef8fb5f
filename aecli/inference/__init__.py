"""Batch inference with a trained model, for every command but `train`: the Predictor, input
files, outputs, reconstruct, encode / decode and diff, one module each."""

from aecli.inference.diff import Diff, diff_files
from aecli.inference.inputs import (
    ImageBatch,
    InputFile,
    collect_inputs,
    image_tensor,
    load_batches,
)
from aecli.inference.latents import decoded_images, encode_files
from aecli.inference.outputs import (
    PngWriter,
    decoded_names,
    image_outputs,
    is_grid,
    plan_outputs,
    write_images,
)
from aecli.inference.predictor import Predictor
from aecli.inference.reconstruct import (
    Reconstruction,
    image_metrics,
    originals_over_reconstructions,
    reconstruct_files,
    summarize_metrics,
)

__all__ = [
    "Diff",
    "ImageBatch",
    "InputFile",
    "PngWriter",
    "Predictor",
    "Reconstruction",
    "collect_inputs",
    "decoded_images",
    "decoded_names",
    "diff_files",
    "encode_files",
    "image_metrics",
    "image_outputs",
    "image_tensor",
    "is_grid",
    "load_batches",
    "originals_over_reconstructions",
    "plan_outputs",
    "reconstruct_files",
    "summarize_metrics",
    "write_images",
]

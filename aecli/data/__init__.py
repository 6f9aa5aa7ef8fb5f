"""Training data behind one interface (TrainingData: in memory or streamed), the data sources,
the built-in shapes, the safe image reader and per-batch transforms."""

from aecli.data.dataset import (
    Batch,
    ImageData,
    TrainingData,
    data_change,
    split,
    validation_count,
)
from aecli.data.sources import fit_tensor, load_data

__all__ = [
    "Batch",
    "ImageData",
    "TrainingData",
    "data_change",
    "fit_tensor",
    "load_data",
    "split",
    "validation_count",
]

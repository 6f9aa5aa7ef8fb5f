"""Data sources, the built-in shapes, the safe image reader and per-batch transforms."""

from aecli.data.sources import (
    ImageData,
    data_change,
    data_record,
    fit_tensor,
    load_data,
    split,
    validation_count,
)

__all__ = [
    "ImageData",
    "data_change",
    "data_record",
    "fit_tensor",
    "load_data",
    "split",
    "validation_count",
]

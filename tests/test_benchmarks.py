"""The quality benchmark's photo splits: held-out sources that no training crop comes from."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import ROOT

if importlib.util.find_spec("skimage") is None:  # its photos: the test extra installs it
    pytest.skip("needs scikit-image's data files", allow_module_level=True)
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402


@pytest.mark.parametrize("name", ["photos32", "photos127"])
def test_the_cross_source_split_shares_no_source_image(name):
    """No held-out source is a training source, by name or by pixels (scikit-image ships one
    photo under two names, chelsea and cat), and every source side holds colour and grey."""
    data = quality.dataset(name)
    split = quality.photo_crops(int(name[6:]), 200, 50)
    assert not set(split.train_sources) & set(split.other_sources)
    assert set(data.sources) == set(quality.VALIDATION_SOURCES)
    images = {n: quality.source_image(n) for n in quality.TRAIN_SOURCES}
    for held in quality.VALIDATION_SOURCES:
        image = quality.source_image(held)
        assert not any(
            image.shape == other.shape and np.array_equal(image, other) for other in images.values()
        ), held

    def grey(n):
        image = quality.source_image(n)
        return bool(
            (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
        )

    for side in (quality.TRAIN_SOURCES, quality.VALIDATION_SOURCES):
        kinds = {grey(n) for n in side}
        assert kinds == {True, False}, side

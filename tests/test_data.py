from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aecli.config import AugmentConfig, DataConfig
from aecli.data import load_data, split
from aecli.data.transforms import augment, to_uint8
from aecli.devices import to_model_range
from aecli.errors import DataError


def test_builtin_shapes_are_deterministic_and_sized():
    config = DataConfig(image_size=24, channels=3, builtin_count=40)
    a, b = load_data(None, config, seed=3), load_data(None, config, seed=3)
    assert a.images.shape == (40, 3, 24, 24) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, load_data(None, config, seed=4).images)
    assert a.class_names == ["circle", "square", "triangle", "ring"]
    assert a.images.float().std() > 20  # real content, not a flat image
    gray = load_data(None, DataConfig(image_size=(20, 30), channels=1, builtin_count=5), seed=0)
    assert gray.images.shape == (5, 1, 20, 30)


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, count in (("cats", 3), ("dogs/puppies", 2)):
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cats" / "broken.png").write_bytes(b"not a png")
    (root / "dogs" / "notes.txt").write_text("ignored")
    return root


def test_folder_source_labels_from_subfolders_and_skips_broken(tmp_path):
    root = make_folder(tmp_path / "images")
    data = load_data(root, DataConfig(image_size=16, channels=3))
    assert data.images.shape == (5, 3, 16, 16)
    assert data.class_names == ["cats", "dogs"]
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1]
    assert [Path(f.path).name for f in data.skipped] == ["broken.png"]
    gray = load_data(root, DataConfig(image_size=(8, 12), channels=1))
    assert gray.images.shape == (5, 1, 8, 12)


def test_folder_without_images_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_data(tmp_path / "empty", DataConfig())


def test_missing_path_lists_layouts(tmp_path):
    with pytest.raises(DataError, match="does not exist; --data takes a folder of images"):
        load_data(tmp_path / "nope", DataConfig())


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((6, 10, 10), np.uint8),
        ((6, 10, 10, 3), np.float32),
        ((6, 3, 10, 10), np.uint8),
        ((6, 10, 10, 1), np.float64),
    ],
)
def test_array_layouts(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    array = rng.random(shape)
    array = (array * 255).astype(np.uint8) if dtype == np.uint8 else array.astype(dtype)
    path = tmp_path / "data.npz"
    np.savez(path, x=array, y=np.arange(6) % 2)
    data = load_data(path, DataConfig(image_size=10, channels=3))
    assert data.images.shape == (6, 3, 10, 10)
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1]
    if dtype == np.uint8 and shape == (6, 3, 10, 10):
        assert torch.equal(data.images, torch.from_numpy(array))


def test_npy_resized_and_float_range_checked(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.full((4, 8, 8), 0.5, dtype=np.float32))
    data = load_data(path, DataConfig(image_size=16, channels=1))
    assert data.images.shape == (4, 1, 16, 16) and data.labels is None
    assert int(data.images.float().mean().round()) == 128
    np.save(path, np.full((4, 8, 8), 2.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        load_data(path, DataConfig(image_size=16, channels=1))


def test_pickled_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled"):
        load_data(path, DataConfig())


def test_npz_without_image_key(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="no 'images' or 'x' array.*pixels"):
        load_data(path, DataConfig())


def test_split_is_seeded_and_disjoint():
    data = load_data(None, DataConfig(image_size=8, builtin_count=50), seed=0)
    train_a, val_a = split(data, 0.2, seed=1)
    train_b, val_b = split(data, 0.2, seed=1)
    assert len(val_a) == 10 and len(train_a) == 40
    assert torch.equal(val_a.images, val_b.images)
    flat = {tuple(x.flatten().tolist()) for x in train_a.images}
    assert not any(tuple(x.flatten().tolist()) in flat for x in val_a.images)


def test_batch_conversion_round_trips():
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    for value_range in ("unit", "symmetric"):
        x = to_model_range(batch, value_range)
        assert x.min() >= (-1 if value_range == "symmetric" else 0) and x.max() <= 1
        assert torch.equal(to_uint8(x, value_range), batch)


def test_batch_conversion_is_the_textbook_formula_in_the_layout_asked_for():
    """Every uint8 value maps to exactly v / 255 (unit) and v / 255 * 2 - 1 (symmetric), and the
    one conversion gives the model's memory format."""
    values = torch.arange(256, dtype=torch.uint8).view(4, 4, 4, 4)  # all 256, 4 channels
    unit = values.float() / 255.0
    for value_range, expected in (("unit", unit), ("symmetric", unit * 2.0 - 1.0)):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = to_model_range(values, value_range, memory_format)
            assert x.dtype == torch.float32 and torch.equal(x, expected)
            assert x.is_contiguous(memory_format=memory_format)
    assert not to_model_range(values, "unit", torch.channels_last).is_contiguous()


def test_augment_flips_and_crops_per_image():
    torch.manual_seed(0)
    x = torch.arange(16.0).view(1, 1, 1, 16).expand(64, 1, 16, 16).contiguous()
    flipped = augment(x, AugmentConfig(hflip=True))
    is_flipped = [(torch.equal(f, i.flip(-1))) for f, i in zip(flipped, x, strict=True)]
    assert 10 < sum(is_flipped) < 54  # about half, chosen per image
    cropped = augment(x, AugmentConfig(crop_scale=(0.5, 0.6)))
    assert cropped.shape == x.shape
    assert (cropped[:, :, :, -1] - cropped[:, :, :, 0]).mean() < 15 * 0.8  # zoomed in

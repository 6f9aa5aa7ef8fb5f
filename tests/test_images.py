"""The one image reader on every awkward input the tests can write."""

from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_zoo
from PIL import Image

from aecli.data.images import ImageReadError, list_images, read_image


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("zoo")
    return root, write_image_zoo(root)


def test_every_bad_file_is_a_named_failure_with_its_reason(zoo):
    root, expected = zoo
    bad = {name: reason for name, reason in expected.items() if reason and "/" not in name}
    for name, reason in bad.items():
        with pytest.raises(ImageReadError) as caught:
            read_image(root / name)
        assert caught.value.path == str(root / name)
        assert reason in caught.value.reason, (name, caught.value.reason)


def test_listing_follows_folders_once_and_reports_the_directory_loop(zoo):
    root, expected = zoo
    found, failures = list_images([root])
    names = {file.relative_to(root).as_posix() for _, file in found}
    assert names == {n for n in expected if n != "nested/back"}
    assert [Path(f.path).name for f in failures] == ["back"]
    assert "symlink loop" in failures[0].reason


def test_a_tiff_named_jpg_is_read_by_its_content(zoo):
    root, _ = zoo
    pixels = read_image(root / "really-a-tiff.jpg")
    assert pixels.shape == (12, 10, 3) and (pixels == (10, 200, 30)).all()


def test_16_bit_values_are_scaled_not_clamped(zoo):
    root, _ = zoo
    assert Image.open(root / "gray16.png").mode.startswith("I")
    row = read_image(root / "gray16.png", channels=1)[0, :, 0]
    assert row.tolist() == [0, 4, 128, 255]  # 1000 / 257 -> 4, never clamped to 255


def test_transparency_is_composited_on_white(zoo):
    root, _ = zoo
    palette = read_image(root / "palette.png")
    assert palette[0, 0].tolist() == [0, 255, 0] and palette[1, 1].tolist() == [255, 255, 255]
    rgba = read_image(root / "rgba.png")
    assert rgba[0, 0].tolist() == [0, 0, 255] and rgba[2, 2].tolist() == [255, 255, 255]
    la = read_image(root / "la.png", channels=1)
    assert la[0, 0, 0] == 0 and la[3, 3, 0] == 255


def test_cmyk_first_frame_and_exif_orientation(zoo):
    root, _ = zoo
    cmyk = read_image(root / "cmyk.jpg").astype(int)
    assert np.abs(cmyk - [255, 0, 0]).max() < 8
    gif = read_image(root / "animated.gif")
    assert gif.shape == (8, 8, 3) and (gif == (255, 0, 0)).all()  # the first of 3 frames
    rotated = read_image(root / "rotated.jpg")
    assert rotated.shape == (30, 10, 3)  # stored 30 wide x 10 high, displayed upright
    top, bottom = rotated[:10].mean(axis=(0, 1)), rotated[-10:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 50  # the red left half is now on top


def test_reader_never_sets_load_truncated_images(zoo):
    from PIL import ImageFile

    root, _ = zoo
    with pytest.raises(ImageReadError):
        read_image(root / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

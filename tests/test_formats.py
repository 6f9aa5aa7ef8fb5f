"""IDX and CIFAR data sources, from small files the tests write in the real formats."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from aecli.config import DataConfig
from aecli.data import load_data, split
from aecli.errors import DataError

RNG = np.random.default_rng(0)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_train_and_test_become_train_and_validation(tmp_path, compress):
    suffix = ".gz" if compress else ""
    train_x = RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test_x = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_x, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(12) % 10, compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test_x, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5), compress)
    data = load_data(tmp_path, DataConfig(image_size=28, channels=1))
    train, val = split(data, 0.5, seed=0)
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_x))
    assert torch.equal(val.images[:, 0], torch.from_numpy(test_x))
    assert train.labels.tolist() == (np.arange(12) % 10).tolist()
    assert val.labels.tolist() == [0, 1, 2, 3, 4]
    assert data.class_names == [str(i) for i in range(10)]


def test_single_idx_file_is_split(tmp_path):
    path = tmp_path / "digits-images-idx3-ubyte"
    write_idx(path, RNG.integers(0, 256, (10, 8, 8), dtype=np.uint8), compress=False)
    data = load_data(path, DataConfig(image_size=16, channels=3))
    assert data.images.shape == (10, 3, 16, 16) and data.labels is None
    assert len(split(data, 0.2, 0)[1]) == 2


def test_idx_bad_magic_number_is_one_line(tmp_path, cli):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(DataError, match="bad magic number 12345678"):
        load_data(tmp_path, DataConfig())
    result = cli("train", "--data", tmp_path)
    assert result.exit_code == 2 and "bad magic number" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_idx_truncated_file(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 8, 8), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_data(path, DataConfig())


def cifar_rows(n: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10_python_batches(tmp_path):
    names = [f"class{i}".encode() for i in range(10)]
    with (tmp_path / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    train_rows = []
    for i in (1, 2):
        rows = cifar_rows(6)
        train_rows.append(rows)
        batch = {
            b"batch_label": b"x",
            b"labels": [i, 3, 4, 5, 6, 7],
            b"data": rows,
            b"filenames": [b"a.png"] * 6,
        }
        with (tmp_path / f"data_batch_{i}").open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    test_rows = cifar_rows(4)
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"labels": [0, 1, 2, 9], b"data": test_rows}, f, protocol=2)
    data = load_data(tmp_path, DataConfig(image_size=32, channels=3))
    assert data.images.shape == (12, 3, 32, 32)
    expected = torch.from_numpy(np.concatenate(train_rows).reshape(-1, 3, 32, 32))
    assert torch.equal(data.images, expected)
    assert data.class_names[9] == "class9" and data.labels[:2].tolist() == [1, 3]
    assert data.validation.labels.tolist() == [0, 1, 2, 9]
    assert data.source["kind"] == "cifar-10"


def test_cifar100_python_uses_fine_labels(tmp_path):
    with (tmp_path / "meta").open("wb") as f:
        pickle.dump(
            {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20}, f
        )
    with (tmp_path / "train").open("wb") as f:
        pickle.dump(
            {"data": cifar_rows(3), "fine_labels": [99, 5, 0], "coarse_labels": [1, 2, 3]}, f
        )
    data = load_data(tmp_path, DataConfig(image_size=16, channels=1))
    assert data.images.shape == (3, 1, 16, 16)
    assert data.labels.tolist() == [99, 5, 0] and data.class_names[99] == "f99"
    assert data.validation is None


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_malicious_pickle_in_cifar_folder_is_refused(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "cifar"
    data.mkdir()
    with (data / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [b"a"]}, f, protocol=2)
    with (data / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": [0]}, f, protocol=2)
    result = cli("train", "--data", data)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to load" in lines[0] and "posix.system" in lines[0]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_binary_versions(tmp_path, hundred):
    rows = cifar_rows(5)
    if hundred:
        labels = np.array([[1, 50], [2, 60], [3, 70], [4, 80], [5, 90]], dtype=np.uint8)
        (tmp_path / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
        np.concatenate([labels, rows], 1).tofile(tmp_path / "train.bin")
        expected = [50, 60, 70, 80, 90]
    else:
        labels = np.array([[3], [1], [4], [1], [5]], dtype=np.uint8)
        (tmp_path / "batches.meta.txt").write_text("\n".join(f"n{i}" for i in range(10)) + "\n")
        np.concatenate([labels, rows], 1).tofile(tmp_path / "data_batch_1.bin")
        np.concatenate([labels[:2], rows[:2]], 1).tofile(tmp_path / "test_batch.bin")
        expected = [3, 1, 4, 1, 5]
    data = load_data(tmp_path, DataConfig(image_size=32, channels=3))
    assert data.labels.tolist() == expected
    assert torch.equal(data.images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))
    assert data.class_names[expected[0]] == ("f50" if hundred else "n3")


def test_unknown_file_lists_the_layouts(tmp_path, cli):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3")
    result = cli("train", "--data", path)
    assert result.exit_code == 2
    assert "MNIST-format IDX" in result.stderr and "CIFAR-10/100" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", ["typo", "empty"])
def test_bad_data_paths_are_one_line_exit_2(tmp_path, cli, case):
    path = tmp_path / ("imagse" if case == "typo" else "empty")
    if case == "empty":
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    result = cli("train", "--data", path, "--out", tmp_path / "run")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]
    assert ("does not exist" if case == "typo" else "no images found") in lines[0]

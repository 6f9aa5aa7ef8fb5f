"""A latent folder as a PyTorch dataset (issue 47): `from aecli import LatentFolder`, items and
batches in the stored dtype, ranks, the order from seed and epoch, flat memory, and shards that
are not what the index says refused in one line wherever the folder is read."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, one_line, photos, write_image

from aecli import LatentFolder
from aecli.io.latent_folder import write_latent_folder
from aecli.io.latents import STORED, LatentFile, LatentFileError

SIZES = [(16, 16), (16, 24), (24, 16)]


def tiny_vae(path: Path, seed: int = 0) -> Path:
    """A random diffusers AutoencoderKL (4 latent channels, 2x down), saved as a folder."""
    import diffusers

    torch.manual_seed(seed)
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two class folders of two photo crops each, of two sizes."""
    root = tmp_path_factory.mktemp("images")
    photos(root / "cat", size=(48, 64))
    photos(root / "dog", size=(32, 48))
    return root


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """30 small images of three sizes in two class folders."""
    root = tmp_path_factory.mktemp("many")
    for i in range(30):
        write_image(root / ("cat" if i % 2 else "dog") / f"{i:02d}.png", SIZES[i % 3], seed=i)
    return root


def encode(cli, vae: Path, images: Path, out: Path, *options) -> Path:
    result = cli("encode", vae, images, "-o", out, "--size", "native", "--device", "cpu",
                 *options)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def bucketed(vae, many, tmp_path_factory) -> Path:
    """The 30 images as a latent folder of three latent shapes in shards of up to 4."""
    from typer.testing import CliRunner

    from aecli.cli import app

    out = tmp_path_factory.mktemp("bucketed") / "lat"
    args = ["encode", str(vae), str(many), "-o", str(out), "--size", "native", "--shard-size",
            "4", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_items_are_the_shards_latents_in_their_stored_dtype(cli, vae, images, tmp_path):
    folder = encode(cli, vae, images, tmp_path / "lat", "--flip", "--store", "moments",
                    "--dtype", "bfloat16", "--shard-size", "3")  # fmt: skip
    data = LatentFolder.open(folder)
    assert len(data) == 4
    # every shard read as aecli reads a latent file (float32), row by row against the items
    rows = [(s, i) for s in data for i in range(len(s))]
    for number, (shard, row) in enumerate(rows):
        item = data[number]
        assert set(item) == {"latents", "latents_std", "latents_flip", "latents_flip_std",
                             "label", "source"}  # fmt: skip
        for field, name in STORED.items():
            assert item[name].dtype == torch.bfloat16  # as stored, not widened
            assert torch.equal(item[name].float(), getattr(shard, field)[row])
        assert item["source"] == shard.sources[row]
        assert item["label"] == int(shard.labels[row]) and isinstance(item["label"], int)
    assert data[-1]["source"] == data[3]["source"] and data[-4]["source"] == data[0]["source"]
    for outside in (4, -5):
        with pytest.raises(IndexError):
            data[outside]
    again = pickle.loads(pickle.dumps(data))  # as DataLoader workers that spawn receive it
    assert torch.equal(again[2]["latents_std"], data[2]["latents_std"])
    plain = LatentFolder.open(encode(cli, vae, images, tmp_path / "plain"))
    assert set(plain[0]) == {"latents", "label", "source"}
    assert plain[0]["latents"].dtype == torch.float32


def test_import_aecli_stays_light_and_exports_the_dataset():
    probe = (
        "import sys, aecli\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules)\n"
        "from aecli import LatentFolder\n"
        "print(LatentFolder.__name__)\n"
        "try:\n    aecli.LatentFile\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert ran.stdout.splitlines() == [
        "False False", "LatentFolder", "module 'aecli' has no attribute 'LatentFile'"
    ], ran.stderr  # fmt: skip


def test_batches_hold_one_shape_and_the_ranks_cover_the_folder_once(bucketed, monkeypatch):
    data = LatentFolder.open(bucketed)
    assert len(data.shapes) == 3 and len(data) == 30
    rows = {data[i]["source"]: data[i] for i in range(len(data))}
    for shuffle in (False, True):
        for world in (1, 2, 3):
            seen = []
            for rank in range(world):
                for batch in data.batches(4, shuffle, rank=rank, world_size=world):
                    assert len(batch["latents"]) == len(batch["labels"]) == len(batch["sources"])
                    assert len(batch["latents"]) <= 4
                    for z, label, source in zip(batch["latents"], batch["labels"],
                                                batch["sources"], strict=True):  # fmt: skip
                        assert torch.equal(z, rows[source]["latents"])
                        assert label == rows[source]["label"]
                    seen += batch["sources"]
            assert sorted(seen) == sorted(rows)  # disjoint, and every latent once
    # drop_last: full batches only, as many on every rank
    counts = []
    for rank in range(3):
        batches = list(data.batches(4, rank=rank, world_size=3, drop_last=True, epoch=1))
        assert all(len(b["latents"]) == 4 for b in batches)
        counts.append(len(batches))
    assert len(set(counts)) == 1 and counts[0] >= 1
    # torchrun's environment picks the rank
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    by_env = [b["sources"] for b in data.batches(4, seed=3)]
    assert by_env == [b["sources"] for b in data.batches(4, seed=3, rank=1, world_size=2)]
    with pytest.raises(ValueError, match="rank 2 of 2"):
        data.batches(4, rank=2)


def test_the_order_is_the_seed_and_the_epoch_alone(bucketed):
    def order(folder, **options):
        return [tuple(b["sources"]) for b in folder.batches(4, **options)]

    data = LatentFolder.open(bucketed)
    first = order(data, seed=5, epoch=2)
    assert first == order(LatentFolder.open(bucketed), seed=5, epoch=2)  # a resumed training
    assert first != order(data, seed=5, epoch=3) and first != order(data, seed=6, epoch=2)
    assert sorted(first) != first  # shuffled batches ...
    in_order = [s for batch in order(data, shuffle=False) for s in batch]
    by_shape = [s for shape in data.shapes for e in data.shards if e.shape == shape
                for s in e.sources]  # fmt: skip
    assert in_order == by_shape  # ... or the folder's order, shape after shape


def test_reading_a_whole_folder_keeps_resident_memory_flat(tmp_path):
    """64 MiB of latents read whole, shuffled and one by one: the process's peak resident memory
    grows by a few batches, not by the folder (a memory-mapped page read would stay resident
    until unmapped)."""
    count = 4096
    latents = LatentFile(torch.randn(count, 4, 32, 32), None, "synthetic",
                         [f"{i}.png" for i in range(count)])  # fmt: skip
    write_latent_folder(tmp_path / "big", latents, weights="w", settings={}, shard_size=600)
    del latents
    data = LatentFolder.open(tmp_path / "big")

    def status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M)[1]) << 10

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    before = status("VmRSS")
    total = 0
    for batch in data.batches(256, shuffle=True):
        total += float(batch["latents"][:, 0, 0, 0].sum())
    for number in range(0, count, 3):
        total += float(data[number]["latents"][0, 0, 0])
    growth = status("VmHWM") - before
    assert growth < 40 << 20, f"{growth >> 20} MiB for a folder of 64 MiB"


def shard(folder: Path, number: int = 0) -> Path:
    index = json.loads((folder / "index.json").read_text())
    return folder / index["shards"][number]["file"]


def refused_everywhere(cli, vae: Path, folder: Path, expected: str, tmp_path: Path) -> None:
    """The folder refused in one line naming the shard and saying `expected`: on opening it,
    and by `aecli decode` (exit 2, no traceback)."""
    with pytest.raises(LatentFileError, match=re.escape(expected)) as refused:
        LatentFolder.open(folder)
    assert shard(folder).name in str(refused.value)
    result = cli("decode", vae, folder, "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2
    line = one_line(result)
    assert shard(folder).name in line and expected in line, line


def test_a_shard_that_is_not_what_the_index_says_is_one_line(cli, vae, images, tmp_path):
    folder = encode(cli, vae, images, tmp_path / "lat", "--dtype", "bfloat16")
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}

    def restore():
        for name, data in saved.items():
            (folder / name).write_bytes(data)

    # cut short, as a copy that did not finish leaves it
    shard(folder).write_bytes(saved[shard(folder).name][:-100])
    refused_everywhere(cli, vae, folder, "the index says", tmp_path)
    assert "cut short" in str(pytest.raises(LatentFileError, LatentFolder.open, folder).value)
    restore()
    # an index whose counts disagree with its shards' (edited, or another encode's)
    index = json.loads(saved["index.json"])
    entry = index["shards"][0]
    entry["count"] += 1
    entry["sources"].append("extra.png")
    entry["labels"].append(0)
    index["count"] += 1
    (folder / "index.json").write_text(json.dumps(index))
    refused_everywhere(cli, vae, folder, "holds 2 latents of shape 4x24x32, the index says 3",
                       tmp_path)  # fmt: skip
    index = json.loads(saved["index.json"])
    index["count"] += 1
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(LatentFileError, match=r"index.json: damaged index \(its count 5 "):
        LatentFolder.open(folder)
    restore()
    # a shard of another encode under the same name: other weights, then another --dtype
    other = encode(cli, tiny_vae(tmp_path / "vae2", seed=1), images, tmp_path / "other",
                   "--dtype", "bfloat16")  # fmt: skip
    shutil.copy(shard(other), shard(folder))
    refused_everywhere(cli, vae, folder, "a shard of another encode", tmp_path)
    half = encode(cli, vae, images, tmp_path / "half", "--dtype", "float16")
    shutil.copy(shard(half), shard(folder))  # the same size: two bytes a value
    refused_everywhere(
        cli, vae, folder, "stores its latents as float16, the index says bfloat16", tmp_path
    )


def test_a_shard_replaced_after_opening_is_refused_when_read(cli, vae, images, tmp_path):
    """The checks hold for reads too: items, batches and the shard by shard iteration that
    `aecli decode` and `aecli stats` use."""
    folder = encode(cli, vae, images, tmp_path / "lat", "--shard-size", "2")
    data = LatentFolder.open(folder)
    assert data[0]["source"]
    good = shard(folder, 1).read_bytes()
    shard(folder, 1).write_bytes(good[:-8])
    expected = f"{shard(folder, 1).name}: {len(good) - 8:,} bytes, the index says {len(good):,}"
    with pytest.raises(LatentFileError, match=expected):
        data[3]
    with pytest.raises(LatentFileError, match=expected):
        list(data.batches(4, shuffle=False))
    with pytest.raises(LatentFileError, match=expected):
        list(data)
    shard(folder, 1).write_bytes(good)
    assert data[3]["source"] == data.sources[3]  # checked again, and read


def test_the_training_loop_in_the_docs_runs_as_written(cli, vae, images, tmp_path):
    """docs/using.md's training loop over a latent folder, run as it is printed there on a
    folder it names (bfloat16 latents, with mirror images and moments)."""
    text = (ROOT / "docs" / "using.md").read_text()
    section = text[text.index("## Training on a latent folder") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    folder = re.search(r'LatentFolder\.open\("([^"]+)"\)', code)[1]
    encode(cli, vae, images, tmp_path / folder, "--flip", "--store", "moments",
           "--dtype", "bfloat16")  # fmt: skip
    (tmp_path / "train.py").write_text(code)
    ran = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", ran.stdout)]
    assert losses and all(np.isfinite(losses)), ran.stdout

"""Latent folders (issue 33): `aecli encode -o DIR/` in shards with an index, mixed sizes and
buckets, resume after a kill, torchrun, a full disk, and every command that reads the folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import folder_held, one_line, pixels, read_pngs, write_image

from aecli.errors import WriteError
from aecli.inference.inputs import Buckets, bucket_preset
from aecli.io.latents import read_latents

SIZES = [(16, 16), (16, 24), (24, 16), (20, 20)]


@pytest.fixture
def images(tmp_path) -> Path:
    """13 images in two class folders, of four sizes, and one file that is not an image."""
    root = tmp_path / "in"
    for i in range(13):
        write_image(root / ("cat" if i % 2 else "dog") / f"{i:02d}.png", SIZES[i % 4], seed=i)
    (root / "cat" / "broken.png").write_bytes(b"not a picture")
    return root


def by_source(folder: Path) -> dict[str, torch.Tensor]:
    """Every latent of a latent folder by its source name, read through the shards alone."""
    index = json.loads((folder / "index.json").read_text())
    found = {}
    for shard in index["shards"]:
        latents = read_latents(folder / shard["file"])
        assert latents.sources == shard["sources"]
        found.update(zip(latents.sources, latents.latents, strict=True))
    return found


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_folder_holds_shards_and_an_index_that_numpy_alone_reads(conv_weights, images, cli):
    out = images.parent / "latents"
    result = cli("encode", conv_weights, images, "-o", f"{out}/", "--shard-size", 4, "--json")
    assert result.exit_code == 1  # the broken file is named and counted
    assert "broken.png" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == 13 and summary["shards"] == 4 and summary["format"] == "folder"
    index = json.loads((out / "index.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [
        f"latents-{k:06d}.safetensors" for k in range(4)
    ]
    assert index["count"] == 13 and [s["count"] for s in index["shards"]] == [4, 3, 4, 2]
    assert index["shapes"] == [{"shape": [2, 4, 4], "count": 13}]
    assert index["class_names"] == ["cat", "dog"]
    assert [f["path"].endswith("broken.png") for f in index["failures"]] == [True]
    # the README's loader: numpy and json only, each shard mapped at its recorded offset
    sources, arrays = [], []
    for shard in index["shards"]:
        arrays.append(
            np.memmap(
                out / shard["file"],
                "<f4",
                "r",
                shard["offset"],
                (shard["count"], *shard["shape"]),
            )  # fmt: skip
        )
        sources += shard["sources"]
    single = images.parent / "z.safetensors"
    assert cli("encode", conv_weights, images, "-o", single).exit_code == 1
    whole = read_latents(single)
    assert sources == whole.sources
    assert np.array_equal(np.concatenate(arrays), whole.latents.numpy())
    labels = [label for shard in index["shards"] for label in shard["labels"]]
    assert labels == whole.labels.tolist()
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["count"] == 13 and info["shards"] == 4 and info["failures"] == 1
    assert info["bytes"] == sum(p.stat().st_size for p in out.iterdir())


def test_native_sizes_make_one_shape_per_shard_and_buckets_make_few(conv_weights, images, cli):
    native = images.parent / "native"
    assert cli("encode", conv_weights, images, "--size", "native", "-o", native,
               "--shard-size", 5).exit_code == 1  # fmt: skip
    index = json.loads((native / "index.json").read_text())
    counts = {tuple(s["shape"]): s["count"] for s in index["shapes"]}
    assert counts == {(2, 4, 4): 4, (2, 4, 6): 3, (2, 6, 4): 3, (2, 5, 5): 3}
    for shard in index["shards"]:  # one shape per shard, as the file itself says
        latents = read_latents(native / shard["file"])
        assert list(latents.latents.shape[1:]) == shard["shape"]
        for source in shard["sources"]:
            h, w = SIZES[int(Path(source).stem) % 4]
            assert shard["shape"] == [2, -(-h // 4), -(-w // 4)]
    bucketed = images.parent / "bucketed"
    assert cli("encode", conv_weights, images, "--buckets", "16x16,16x24", "-o", bucketed,
               "--shard-size", 20).exit_code == 1  # fmt: skip
    index = json.loads((bucketed / "index.json").read_text())
    counts = {tuple(s["shape"]): s["count"] for s in index["shapes"]}
    # wide (16x24) to the wide bucket; square, tall and 20x20 to the square one
    assert counts == {(2, 4, 4): 10, (2, 4, 6): 3}
    assert len(index["shards"]) == 2


def test_buckets_pick_the_nearest_aspect_and_the_preset_is_documented():
    buckets = Buckets([(256, 256), (192, 320), (320, 192)])
    assert buckets.nearest(1000, 1000) == (256, 256)
    assert buckets.nearest(600, 1000) == (192, 320)
    assert buckets.nearest(1000, 560) == (320, 192)
    preset = bucket_preset(256, 8)
    assert (256, 256) in preset and all(h % 32 == 0 and w % 32 == 0 for h, w in preset)
    assert all(2 * max(h, w) <= 5 * min(h, w) for h, w in preset)
    assert sorted(preset) == sorted((w, h) for h, w in preset)  # as many tall as wide
    assert all(abs(h * w - 256 * 256) / (256 * 256) < 0.1 for h, w in preset)


def test_same_seed_samples_the_same_whatever_the_shards(conv_weights, images, cli):
    one, folder = images.parent / "z.safetensors", images.parent / "sampled"
    assert cli("encode", conv_weights, images, "--sample", "--seed", 4, "-o", one).exit_code == 1
    assert cli("encode", conv_weights, images, "--sample", "--seed", 4, "-o", folder,
               "--shard-size", 3, "--batch-size", 2).exit_code == 1  # fmt: skip
    whole = read_latents(one)
    found = by_source(folder)
    # the same noise; the mean differs only by the rounding of other batch sizes
    torch.testing.assert_close(torch.stack([found[s] for s in whole.sources]), whole.latents)
    other = images.parent / "other.safetensors"
    assert cli("encode", conv_weights, images, "--sample", "--seed", 5, "-o", other).exit_code == 1
    assert (read_latents(other).latents - whole.latents).abs().mean() > 0.1


KILLER = """
import os, signal, sys
import aecli.io.latent_folder as lf
real_parts, real_text = lf.atomic_write_parts, lf.atomic_write_text
def parts(path, chunks, **kw):
    if {mid} and path.name.startswith("latents-{at:06d}"):  # half a shard on disk, then killed
        with open(path.with_name("." + path.name + ".aecli-0badcafe.tmp"), "wb") as f:
            f.write(bytes(chunks[0])[:50])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_parts(path, chunks, **kw)
def text(path, data, **kw):
    real_text(path, data, **kw)
    if not {mid} and path.name == "unit-{at:06d}.json":  # between two units' shards
        os.kill(os.getpid(), signal.SIGKILL)
lf.atomic_write_parts, lf.atomic_write_text = parts, text
from aecli.cli import main
sys.argv = ["aecli", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("mid", [True, False], ids=["mid-shard", "between-shards"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(conv_weights, images, tmp_path, mid):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(mid=mid, at=2))
    args = [str(conv_weights), str(images), "--size", "native", "--shard-size", "3",
            "--device", "cpu", "--workers", "0"]  # fmt: skip

    def run(*extra, program=None):
        command = [sys.executable, *(["-m", "aecli"] if program is None else [program])]
        return subprocess.run(
            [*command, "encode", *args, *extra], capture_output=True, text=True, timeout=300
        )

    whole = tmp_path / "whole"
    assert run("-o", str(whole)).returncode == 1  # the broken file
    cut = tmp_path / "cut"
    killed = run("-o", str(cut), program=str(script))
    assert killed.returncode == -signal.SIGKILL
    assert not (cut / "index.json").exists() and (cut / "encode.json").exists()
    refused = run("-o", str(cut))
    assert refused.returncode == 2
    assert "holds an unfinished encode; pass --resume" in refused.stderr
    assert "--overwrite" in refused.stderr
    done_before = {p.name: p.stat().st_mtime_ns for p in cut.glob("latents-*")}
    resumed = run("-o", str(cut), "--resume")
    assert resumed.returncode == 1, resumed.stderr
    assert "inputs were done already" in resumed.stderr
    assert folder_bytes(cut) == folder_bytes(whole)  # same shards, same index, nothing else
    kept = {n for n, t in done_before.items() if (cut / n).stat().st_mtime_ns == t}
    assert kept  # complete units were not encoded again
    again = run("-o", str(cut), "--resume")
    assert again.returncode == 1 and folder_bytes(cut) == folder_bytes(whole)


@pytest.mark.slow
def test_two_torchrun_processes_write_what_one_process_writes(conv_weights, images, tmp_path):
    args = [str(conv_weights), str(images), "--size", "native", "--shard-size", "2",
            "--device", "cpu"]  # fmt: skip
    single, split = tmp_path / "single", tmp_path / "split"
    one = subprocess.run(
        [sys.executable, "-m", "aecli", "encode", *args, "-o", str(single)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 1, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "aecli", "encode", *args, "-o", str(split)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (split / "index.json").exists(), two.stderr
    assert folder_bytes(split) == folder_bytes(single)  # identical on the CPU, index included
    index = json.loads((split / "index.json").read_text())
    assert index["count"] == 13 and len(index["failures"]) == 1


def test_a_full_disk_stops_in_one_line_and_resume_finishes(
    conv_weights, images, tmp_path, cli, monkeypatch
):
    import aecli.io.latent_folder as lf

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["encode", conv_weights, images, "--shard-size", 3, "--workers", 0]
    assert cli(*args, "-o", whole).exit_code == 1
    real, calls = lf.atomic_write_parts, []

    def full(path, chunks, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise WriteError(os.strerror(errno.ENOSPC).join(["cannot write: ", ""]), path=path)
        return real(path, chunks, **kw)

    monkeypatch.setattr(lf, "atomic_write_parts", full)
    result = cli(*args, "-o", cut)
    assert result.exit_code == 1
    line = one_line(result)
    assert "latents-000002.safetensors: cannot write: No space left on device" in line
    assert "every complete shard is kept" in line and "--resume" in line
    assert sorted(p.name for p in cut.glob("latents-*")) == [
        "latents-000000.safetensors", "latents-000001.safetensors"
    ]  # fmt: skip
    monkeypatch.setattr(lf, "atomic_write_parts", real)
    assert cli(*args, "-o", cut, "--resume").exit_code == 1
    assert folder_bytes(cut) == folder_bytes(whole)


def test_what_a_folder_refuses(conv_weights, tiny_weights, images, tmp_path, cli):
    out = tmp_path / "z"
    args = ["encode", conv_weights, images, "-o", out, "--shard-size", 4]
    assert cli(*args).exit_code == 1
    result = cli(*args)
    assert result.exit_code == 2
    assert "holds a finished encode; pass --resume" in one_line(result)
    assert cli(*args, "--resume").exit_code == 1  # nothing to do: the same folder again
    result = cli(*args, "--resume", "--shard-size", 5)
    assert "was encoded with --shard-size 4, this command gives 5" in one_line(result)
    result = cli("encode", tiny_weights, images, "-o", out, "--shard-size", 4, "--resume")
    line = one_line(result)
    assert result.exit_code == 2 and "was written by model" in line and "--force" in line
    fingerprints = json.loads((out / "index.json").read_text())["fingerprint"]
    assert fingerprints in line
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = cli("encode", conv_weights, images, "-o", keep, *extra)
        assert result.exit_code == 2 and "holds files aecli did not write (notes.txt)" in one_line(
            result
        )
    assert (keep / "notes.txt").read_text() == "mine"
    result = cli("encode", conv_weights, images, "-o", images / "z")
    assert result.exit_code == 2 and "inside the input folder" in one_line(result)
    result = cli("encode", conv_weights, images, "-o", out, "--format", "npy")
    assert "a latent folder holds safetensors shards" in one_line(result)
    result = cli("encode", conv_weights, images, "-o", tmp_path / "a.npy", "--resume")
    assert "--resume: for a latent folder" in one_line(result)


def test_a_second_encode_into_a_folder_in_use_is_refused(conv_weights, images, tmp_path, cli):
    out = tmp_path / "busy"
    out.mkdir()
    with folder_held(out / ".aecli-encode.lock") as pid:  # as an encode holds it
        result = cli("encode", conv_weights, images, "-o", out)
        assert result.exit_code == 2
        expected = f"another aecli encode is writing this folder (process {pid})"
        assert expected in one_line(result)
    assert cli("encode", conv_weights, images, "-o", out).exit_code == 1  # free again
    assert not (out / ".aecli-encode.lock").exists()


def test_decode_reads_a_folder_shard_by_shard_and_selects(conv_weights, images, tmp_path, cli):
    folder, single = tmp_path / "lat", tmp_path / "z.safetensors"
    assert cli("encode", conv_weights, images, "--size", "native", "-o", folder,
               "--shard-size", 3).exit_code == 1  # fmt: skip
    assert cli("decode", conv_weights, folder, "-o", tmp_path / "a").exit_code == 0
    decoded = read_pngs(tmp_path / "a")
    assert sorted(decoded) == sorted(f"{c}/{i:02d}.png" for i in range(13)
                                     for c in ["cat" if i % 2 else "dog"])  # fmt: skip
    for name, array in decoded.items():  # each at its own size
        assert array.shape[:2] == SIZES[int(Path(name).stem) % 4]
    one = images / "dog" / "04.png"
    assert cli("encode", conv_weights, one, "--size", "native", "-o", single).exit_code == 0
    assert cli("decode", conv_weights, single, "-o", tmp_path / "b").exit_code == 0
    alone = read_pngs(tmp_path / "b")["04.png"].astype(int)  # batched alone: the same to rounding
    assert np.abs(alone - decoded["dog/04.png"]).max() <= 1
    result = cli("decode", conv_weights, folder, "-o", tmp_path / "g.png",
                 "--select", "dog/04.png", "--select", "8", "--json")  # fmt: skip
    assert result.exit_code == 0 and json.loads(result.stdout)["count"] == 2
    result = cli("decode", conv_weights, folder, "-o", tmp_path / "g2.png")
    assert "holds latents of 4 shapes" in one_line(result)
    result = cli("decode", conv_weights, folder, "-o", tmp_path / "c", "--select", "cat/99.png")
    assert "--select cat/99.png: no latent of that source" in one_line(result)


def test_interpolate_and_sample_use_folders(conv_weights, images, tmp_path, cli):
    folder, single = tmp_path / "lat", tmp_path / "a.safetensors"
    assert cli("encode", conv_weights, images, "-o", folder, "--scaled").exit_code == 1
    assert cli("encode", conv_weights, images / "dog" / "00.png", "-o", single,
               "--scaled").exit_code == 0  # fmt: skip
    by_folder, by_file = tmp_path / "f.png", tmp_path / "s.png"
    end = images / "cat" / "01.png"
    assert cli("interpolate", conv_weights, f"{folder}#dog/00.png", end, "-o", by_folder,
               "--steps", 3).exit_code == 0  # fmt: skip
    assert cli("interpolate", conv_weights, single, end, "-o", by_file, "--steps", 3).exit_code == 0
    assert np.abs(pixels(by_folder).astype(int) - pixels(by_file)).max() <= 1
    result = cli("interpolate", conv_weights, folder, end, "-o", tmp_path / "x.png")
    assert "holds 13 latents; pick one" in one_line(result)
    sampled = tmp_path / "sampled"
    result = cli("sample", conv_weights, "-n", 7, "--seed", 2, "--latents-out", f"{sampled}/",
                 "-o", tmp_path / "direct.png")  # fmt: skip
    assert result.exit_code == 0
    assert cli("decode", conv_weights, sampled, "-o", tmp_path / "again.png").exit_code == 0
    assert np.array_equal(pixels(tmp_path / "direct.png"), pixels(tmp_path / "again.png"))


def test_a_damaged_or_hostile_index_is_one_line(conv_weights, images, tmp_path, cli):
    folder = tmp_path / "lat"
    assert cli("encode", conv_weights, images, "-o", folder, "--shard-size", 5).exit_code == 1
    index = json.loads((folder / "index.json").read_text())
    cases = {
        "escape": ("file", "../../etc/passwd", "is not a shard name"),
        "count": ("count", -1, "shards.0.count: Input should be greater than or equal to 1"),
        "shape": ("shape", [4, "8", 8], "shards.0.shape.1: Input should be a valid integer"),
        "sources": ("sources", ["a"], "not as many source names"),
    }
    for key, value, expected in cases.values():
        broken = json.loads(json.dumps(index))
        broken["shards"][0][key] = value
        (folder / "index.json").write_text(json.dumps(broken))
        result = cli("decode", conv_weights, folder, "-o", tmp_path / "out")
        assert result.exit_code == 2 and expected in one_line(result)
    (folder / "index.json").write_text(json.dumps(index)[:100])
    assert "damaged" in one_line(cli("info", folder))
    (folder / "index.json").write_text(json.dumps(index))
    shard = folder / index["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-8])
    result = cli("decode", conv_weights, folder, "-o", tmp_path / "out2")
    assert result.exit_code == 2 and index["shards"][1]["file"] in one_line(result)
    shard.unlink()
    os.mkfifo(shard)  # would block a reader forever
    result = cli("decode", conv_weights, folder, "-o", tmp_path / "out3")
    assert result.exit_code == 2 and "not a regular file" in one_line(result)

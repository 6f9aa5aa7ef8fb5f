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


def test_the_vae_families_benchmark_prints_a_row_per_family(tmp_path):
    """benchmarks/vae_families.py at test widths: an encode and a decode row for every release
    of every family aecli reads, with figures (the whole commands timed for one family, to stay
    quick), and a benchmark entry for every family there is."""
    import re
    import subprocess

    pytest.importorskip("diffusers")
    import vae_families

    from aecli.io.vae_families import FAMILIES

    assert set(FAMILIES) <= set(vae_families.RELEASES), "a family with no benchmark entry"
    script = ROOT / "benchmarks" / "vae_families.py"
    options = "--size small --images 2 --repeats 1 --image 64 --device cpu --warmup 0"
    options += " --command-warmup 0 --commands AutoencoderTiny"
    command = [sys.executable, str(script), *options.split()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("| \n").split("|")]
        if len(cells) == 11 and cells[2] in ("encode", "decode"):
            rows[cells[0], cells[1], cells[2]] = cells[3:]
    number = re.compile(r"^[\d,]+\.\d$")
    for name, releases in vae_families.RELEASES.items():
        for release in releases:
            for direction in ("encode", "decode"):
                found = rows.get((name, release, direction))
                if name not in FAMILIES:
                    assert found is None
                    assert f"skipped {name}:" in done.stdout
                    continue
                assert found is not None, (name, release, direction, done.stdout)
                assert number.match(found[0]) and number.match(found[1]), found
                assert found[2].endswith("x")
                if name != "AutoencoderTiny":
                    assert found[3:] == ["-"] * 5
                    continue
                assert all(number.match(c) for c in found[3:5]), found
                # each side's peak memory: a whole process, more than its 50 MB interpreter
                peaks = [float(c.removesuffix(" GiB")) for c in found[6:8]]
                assert all(0.05 < peak < 64 for peak in peaks), found


def test_the_latent_loader_benchmark_prints_both_readers_and_their_memory(tmp_path):
    """benchmarks/latent_loader.py at a tiny size: latents/s of LatentFolder and of the bare
    numpy loop with their ratio, in order and shuffled, and each reader's peak memory growth at
    two folder sizes."""
    import subprocess

    script = ROOT / "benchmarks" / "latent_loader.py"
    options = f"--count 400 --shard-size 64 --batch-size 32 --repeats 1 --dir {tmp_path}"
    done = subprocess.run([sys.executable, str(script), *options.split()], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip("| \n").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]
    speeds = {row[0]: row[1:] for row in rows if row[0] in ("in order", "shuffled")}
    assert set(speeds) == {"in order", "shuffled"}, done.stdout
    for ours, bare, ratio in speeds.values():
        assert float(ours.replace(",", "")) > 0 and float(bare.replace(",", "")) > 0
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
    memory = [row for row in rows if len(row) == 5 and row[0] in ("100", "400")]
    assert [(row[0], row[2]) for row in memory] == [
        (count, reader) for count in ("100", "400") for reader in ("LatentFolder", "bare np.memmap")
    ], done.stdout
    assert all(row[4].endswith(" MiB") and float(row[4][:-4]) >= 0 for row in memory)
    assert not list(tmp_path.iterdir())  # its folders are removed


@pytest.mark.parametrize("folds", [4, 5])
def test_the_folds_hold_out_every_source_once_with_colour_and_grey(folds):
    """--folds: every photo source is held out by exactly one fold, each fold's held-out crops
    come from its own sources only, and each fold holds out colour and grey sources."""
    groups = quality.fold_groups(folds)
    names = [n for group in groups for n in group]
    assert sorted(names) == sorted(quality.TRAIN_SOURCES + quality.VALIDATION_SOURCES)
    for group in groups:
        assert {n in quality.GREY_SOURCES for n in group} == {True, False}, group
    data = quality.fold_crops(32, 40, 20, groups[0])
    assert set(data.sources) == set(groups[0]) and len(data.train) == 40

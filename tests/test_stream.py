"""Streamed data: image folders and WebDataset shards read from disk every epoch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import StopAt, assert_same_weights

from aecli.config import load_config
from aecli.data import load_data
from aecli.data.dataset import TrainingData, data_random
from aecli.data.shards import expand_braces
from aecli.data.stream import StreamedData, fit_sample, key_hash
from aecli.errors import DataError, Interrupted
from aecli.io.checkpoint import load_checkpoint
from aecli.run.setup import plan_resume
from aecli.run.training import resume, train, trainer_in

# A fully convolutional model small enough for seconds of training on 32x32 crops.
STREAMED = """\
data: {image_size: 32, channels: 3, val_fraction: 0.1}
model:
  encoder:
    - {type: conv, out: 8, stride: 2, act: relu}
    - {type: conv, out: 8, stride: 2, act: relu}
  latent: {channels: 4}
  decoder:
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv, out: 3}
train: {epochs: 2, batch_size: 16, grid_images: 4, log_every: 1}
"""


def photo(i: int) -> Image.Image:
    """A photo-like image of its own size (40 to 90 pixels a side) and pattern."""
    rng = np.random.default_rng(i)
    h, w = (int(v) for v in rng.integers(40, 90, 2))
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack(
        [(x * (i % 7 + 1)) % 256, (y * 3 + i) % 256, ((x + y) * 2 + 7 * i) % 256], -1
    ).astype(np.uint8)
    return Image.fromarray(pixels)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, shards: int, per_shard: int, start: int = 0) -> list[Path]:
    """WebDataset shards as img2dataset writes them: KEY.jpg beside KEY.json."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = root / f"{start + s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                key = f"{(start + s) * per_shard + j:06d}"
                add_member(tar, f"{key}.jpg", jpeg(photo((start + s) * per_shard + j)))
                add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "photos"
    root.mkdir()
    for i in range(120):
        photo(i).save(root / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(root, 4, 30)
    return root


def streamed_config(tmp_path: Path, overrides=()):
    preset = tmp_path / "streamed.yaml"
    preset.write_text(STREAMED)
    return load_config(str(preset), ["data.workers=0", *overrides]).config


def test_brace_patterns_expand_as_the_shell_does():
    assert expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="more than 1,000,000 shards"):
        expand_braces("{0..999999}/{0..9}.tar")  # refused before a name is made


def test_folders_and_shards_stream_and_train(photo_folder, shard_folder, tmp_path):
    for name, path in (
        ("folder", photo_folder),
        ("shards", str(shard_folder / "{00000..00003}.tar")),
    ):
        config = streamed_config(tmp_path, ["data.stream=true", "data.workers=1"])
        data = load_data(path, config.data, 0)
        assert isinstance(data, StreamedData) and data.source["streamed"]
        assert len(data) + len(data.validation) == 120
        assert data.validation.images.shape[1:] == (3, 32, 32)
        result = train(config, data, tmp_path / name, preset="streamed", device="cpu")
        history = result.history
        assert history[-1]["val_loss"] < history[0]["val_loss"] * 1.05
        state = json.loads((tmp_path / name / "state.json").read_text())
        assert state["state"] == "finished" and state["data"]["streamed"] is True
        assert state["skipped_images"] == 0
        assert (tmp_path / name / "samples.png").is_file()


def test_validation_is_chosen_by_key_and_does_not_move_as_the_set_grows(tmp_path):
    root = tmp_path / "grow"
    write_shards(root, 2, 40)
    config = streamed_config(tmp_path, ["data.val_max=1000"]).data
    before = load_data(root, config, 0)
    held = {before.keys[i] for i in range(len(before.keys)) if i not in set(before.train)}
    assert held and all(key_hash(k) < config.val_fraction for k in held)
    write_shards(root, 1, 40, start=2)
    after = load_data(root, config, 0)
    held_after = {after.keys[i] for i in range(len(after.keys)) if i not in set(after.train)}
    assert held <= held_after
    capped = load_data(root, config.model_copy(update={"val_max": 3}), 0)
    assert len(capped.validation) == 3


def test_auto_streams_a_folder_too_large_for_a_quarter_of_memory(photo_folder, monkeypatch):
    config = load_config("cat-kl-f8", ["data.image_size=32"]).config.data
    assert not isinstance(load_data(photo_folder, config), StreamedData)  # fits: in memory
    import aecli.devices

    monkeypatch.setattr(aecli.devices, "available_memory", lambda device: 4 * 120 * 3 * 32 * 32)
    assert not isinstance(load_data(photo_folder, config), StreamedData)  # exactly a quarter
    monkeypatch.setattr(aecli.devices, "available_memory", lambda device: 100_000)
    assert isinstance(load_data(photo_folder, config), StreamedData)
    # data.resize and random crops need the full images: they stream
    random = config.model_copy(update={"crop": "random"})
    assert isinstance(load_data(photo_folder, random), StreamedData)


def test_random_crops_repeat_by_seed_epoch_and_sample():
    config = load_config(
        "cat-kl-f8", ["data.image_size=32", "data.resize=[40,64]", "data.crop=random"]
    ).config.data
    image = photo(3)

    def draw(*seed) -> np.ndarray:
        return np.asarray(fit_sample(image, config, data_random("sample", *seed)))

    assert draw(1, 1, 3).shape == (32, 32, 3)
    assert np.array_equal(draw(1, 1, 3), draw(1, 1, 3))
    assert not np.array_equal(draw(1, 1, 3), draw(1, 2, 3))  # another epoch, another crop
    centre = np.asarray(fit_sample(image, config, None))  # validation: the low end, the centre
    assert centre.shape == (32, 32, 3)


def test_both_kinds_of_data_give_their_batches_through_one_interface(photo_folder, shard_folder):
    """In memory and streamed, the data are TrainingData; an epoch's order is the one drawn
    before the interface (in memory a torch permutation from the step seed of -epoch, streamed
    numpy's from [seed, epoch, 0x5EED] by shard), and the batches from position k are the
    epoch's batches from k on: what a resumed run trains on."""
    from aecli.data.dataset import step_seed

    config = load_config("cat-kl-f8", ["data.image_size=32", "data.workers=0"]).config.data
    memory = load_data(photo_folder, config.model_copy(update={"stream": False}), 0)
    stream = load_data(shard_folder, config.model_copy(update={"stream": True}), 0)
    for data in (memory, stream):
        assert isinstance(data, TrainingData)
        train_part, validation = data.split(0.1, 3)
        assert len(validation) and validation.images.shape[1:] == (3, 32, 32)
        record = train_part.record(validation)
        assert record["train"]["count"] == len(train_part)
        train_part = train_part.placed(lambda tensor: tensor)
        order = train_part.epoch_order(3, 2)
        share = order[: len(order) // 2 * 2][1::2]  # rank 1 of 2
        every = list(train_part.batches(share, 5, 0, seed=3, epoch=2, pin_memory=False))
        assert [b.number for b in every] == list(range(-(-len(share) // 5)))
        later = list(train_part.batches(share, 5, 2, seed=3, epoch=2, pin_memory=False))
        assert [b.number for b in later] == [b.number for b in every[2:]]
        for a, b in zip(every[2:], later, strict=True):
            assert np.array_equal(a.images.numpy(), b.images.numpy()) and not b.failures
            assert np.array_equal(np.asarray(a.samples), np.asarray(b.samples))
        assert np.array_equal(np.asarray(every[0].samples), np.asarray(share[:5]))
    memory_train = memory.split(0.1, 3)[0]
    generator = torch.Generator().manual_seed(step_seed(3, -2))
    drawn = torch.randperm(len(memory_train), generator=generator)
    assert torch.equal(memory_train.epoch_order(3, 2), drawn)
    rng, shard_of = np.random.default_rng([3, 2, 0x5EED]), [m.shard for m in stream.members]
    expected = []
    for shard in rng.permutation(len(stream.shards)):
        mine = np.array([i for i in stream.train if shard_of[i] == shard])
        expected += list(mine[rng.permutation(len(mine))])
    assert list(stream.epoch_order(3, 2)) == expected


def test_workers_do_not_change_what_trains(shard_folder, tmp_path):
    weights = []
    for workers in (0, 2):
        config = streamed_config(tmp_path, [f"data.workers={workers}", "data.crop=random"])
        data = load_data(shard_folder, config.data, 0)
        train(config, data, tmp_path / f"w{workers}", preset="streamed", device="cpu")
        weights.append(tmp_path / f"w{workers}")
    assert_same_weights(*weights)


def test_streamed_resume_mid_epoch_is_exact_and_reads_only_the_rest(
    shard_folder, tmp_path, monkeypatch
):
    """A streamed run stopped in the middle of an epoch and resumed gives the uninterrupted
    run's weights, and the resumed epoch decodes only the batches after the checkpoint."""
    config = streamed_config(tmp_path, ["data.crop=random", "train.epochs=3"])
    data = load_data(shard_folder, config.data, 0)
    train(config, data, tmp_path / "straight", preset="streamed", device="cpu")

    reporter = StopAt(step=9)  # epoch 2 (7 steps an epoch), its third batch
    trainer = trainer_in(
        config, data, tmp_path / "cut", preset="streamed", reporter=reporter, device="cpu"
    )
    reporter.trainer = trainer
    with pytest.raises(Interrupted):
        trainer.fit()
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["train_state"]
    assert (state["epoch"], state["batch"]) == (2, 2)

    decoded: list[int] = []
    real = StreamedData.sample

    def counted(self, sample, rng):
        if rng is not None:  # a training sample (validation and statistics draw no crop)
            decoded.append(sample)
        return real(self, sample, rng)

    monkeypatch.setattr(StreamedData, "sample", counted)
    plan = plan_resume(tmp_path / "cut")
    resume(plan, load_data(shard_folder, config.data, 0), tmp_path / "cut", device="cpu")
    assert_same_weights(tmp_path / "straight", tmp_path / "cut")
    # epoch 2 from its third batch (len - 2 * 16 samples), then all of epoch 3
    assert len(decoded) == (len(data) - 2 * 16) + len(data)


def test_bad_members_and_cut_shards_are_named_and_skipped(tmp_path, cli):
    root = tmp_path / "bad"
    write_shards(root, 2, 20)
    with tarfile.open(root / "00002.tar", "w") as tar:  # a member that is not a picture
        add_member(tar, "broken.jpg", b"not a jpeg at all")
        add_member(tar, "evil\x1b[2J.jpg", b"a terminal escape in its name")
        for j in range(10):
            add_member(tar, f"good{j}.jpg", jpeg(photo(100 + j)))
    whole = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a member
    preset = tmp_path / "streamed.yaml"
    preset.write_text(STREAMED)
    run = tmp_path / "run"
    ran = cli(
        "train",
        preset,
        "--data",
        root,
        "--out",
        run,
        "--device",
        "cpu",
        "--json",
        "--set",
        "train.epochs=2",
    )
    assert ran.exit_code == 0, ran.output
    assert ran.stderr.count("broken.jpg") == 1  # named once, not once an epoch
    assert "evil\\x1b[2J.jpg" in ran.stderr and "\x1b" not in ran.stderr  # shown, not obeyed
    assert "00001.tar" in ran.stderr and "the rest is lost" in ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["skipped_images"] == 3  # the cut shard and the two broken members
    assert json.loads((run / "state.json").read_text())["skipped_images"] == 2


@pytest.mark.parametrize(
    "data, message",
    [
        ("{00000..00009}.tar", "shard not found"),
        ("empty", "no images found"),
        ("zipped.tar", "compressed shards cannot be read by offset"),
    ],
)
def test_missing_shards_are_one_line_before_training(data, message, tmp_path, cli):
    import gzip

    (tmp_path / "empty").mkdir()
    write_shards(tmp_path / "plain", 1, 3)
    (tmp_path / "zipped.tar").write_bytes(
        gzip.compress((tmp_path / "plain/00000.tar").read_bytes())
    )
    preset = tmp_path / "streamed.yaml"
    preset.write_text(STREAMED)
    ran = cli(
        "train",
        preset,
        "--data",
        str(tmp_path / data),
        "--out",
        tmp_path / "run",
        "--set",
        "data.stream=true",
    )
    assert ran.exit_code != 0
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_in_memory_sources_refuse_streaming_options(digits_npz, tmp_path):
    config = load_config("mnist-cae", ["data.stream=true"]).config.data
    with pytest.raises(DataError, match="read into memory whole"):
        load_data(digits_npz, config)


def test_separate_validation_data_holds_out_nothing(photo_folder, shard_folder, tmp_path):
    config = streamed_config(tmp_path).data
    data = load_data(shard_folder, config, 0, validation=photo_folder)
    assert len(data) == 120 and len(data.validation) == 120
    assert data.validation.source["split"] == "validation"


@pytest.mark.slow
def test_ctrl_c_with_workers_running_saves_and_resumes(shard_folder, tmp_path, cli):
    """Ctrl-C in a terminal reaches the decoding workers too: the run still saves, says how to
    resume, and exits 130."""
    import signal
    import time

    preset = tmp_path / "streamed.yaml"
    preset.write_text(STREAMED)
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "aecli", "train", str(preset), "--data", str(shard_folder),
         "--out", str(run), "--epochs", "500", "--device", "cpu", "--set", "data.workers=2",
         "--set", "train.checkpoint_every=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (run / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # the main process and its workers, as a terminal does
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"aecli train --resume {run}" in stderr and "Traceback" not in stderr
    assert json.loads((run / "state.json").read_text())["state"] == "interrupted"
    epoch = load_checkpoint(run / "checkpoint.safetensors")["train_state"]["epoch"]
    resumed = cli("train", "--resume", run, "--epochs", epoch, "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output


def test_a_non_finite_loss_stops_a_streamed_run_with_workers_running(shard_folder, tmp_path, cli):
    preset = tmp_path / "streamed.yaml"
    preset.write_text(STREAMED)
    ran = cli("train", preset, "--data", shard_folder, "--out", tmp_path / "run", "--device",
              "cpu", "--lr", "1e12", "--set", "data.workers=2", "--epochs", "50")  # fmt: skip
    assert ran.exit_code == 1, ran.output
    assert "became non-finite" in ran.stderr and "Traceback" not in ran.stderr
    assert json.loads((tmp_path / "run" / "state.json").read_text())["state"] == "failed"


@pytest.mark.slow
def test_torchrun_ranks_and_workers_read_disjoint_shares(shard_folder, tmp_path):
    """2 gloo processes x 2 workers, one epoch: every training sample decoded exactly once
    across ranks and workers (less the remainder that does not fill a rank's equal share)."""
    log = tmp_path / "keys"
    log.mkdir()
    script = tmp_path / "record.py"
    script.write_text(
        f"""
import os, sys
from aecli.data.stream import StreamedData
real = StreamedData.sample
def sample(self, number, rng):
    if rng is not None:
        with open(os.path.join({str(log)!r}, str(os.getpid())), "a") as f:
            f.write(self.keys[number] + "\\n")
    return real(self, number, rng)
StreamedData.sample = sample
from aecli.cli import main
sys.argv = ["aecli", *sys.argv[1:]]
main()
"""
    )
    preset = tmp_path / "streamed.yaml"
    preset.write_text(STREAMED)
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            "train",
            str(preset),
            "--data",
            str(shard_folder),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--set",
            "train.epochs=1",
            "--set",
            "data.workers=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ran.returncode == 0, ran.stderr
    files = list(log.iterdir())
    assert len(files) >= 4  # two workers on each of two ranks
    seen = [line for f in files for line in f.read_text().splitlines()]
    data = load_data(shard_folder, load_config(str(preset)).config.data, 0)
    train_keys = {data.keys[i] for i in data.train}
    assert len(seen) == len(set(seen))  # nothing twice
    assert set(seen) <= train_keys
    assert len(seen) == len(train_keys) // 2 * 2  # all but the remainder of an odd count

"""Hostile streamed data (issue 45): shards that are FIFOs, members larger than any image, data
that change under a resumed run, an emptied data folder; and the training progress bar."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import one_line, within, write_image
from test_engine import StopAt
from test_stream import STREAMED, jpeg, photo, streamed_config, write_shards

from aecli.cli.train import RichReporter, RunTimeColumn
from aecli.config import load_config
from aecli.data import load_data
from aecli.data.images import MAX_IMAGE_BYTES, Failure
from aecli.data.shards import index_shard
from aecli.errors import DataError, Interrupted
from aecli.io.checkpoint import load_checkpoint, save_checkpoint
from aecli.run.training import train, trainer_in


def train_args(preset: Path, data, run: Path, *extra) -> list:
    return ["train", preset, "--data", data, "--out", run, "--device", "cpu", *extra]


@pytest.fixture
def preset(tmp_path: Path) -> Path:
    path = tmp_path / "streamed.yaml"
    path.write_text(STREAMED)
    return path


# -- D7: a FIFO among the shards ---------------------------------------------------------------


@pytest.mark.parametrize("named", ["folder", "file", "pattern"])
def test_a_fifo_shard_is_refused_in_one_line_and_never_blocks(named, tmp_path, preset, cli):
    root = tmp_path / "shards"
    write_shards(root, 2, 6)
    os.mkfifo(root / "00002.tar")  # sorts among the shards; a reader would block forever
    data = {"folder": root, "file": root / "00002.tar", "pattern": root / "{00000..00002}.tar"}
    with within(60):
        ran = cli(*train_args(preset, data[named], tmp_path / "run"))
    assert ran.exit_code == 2
    line = one_line(ran)
    assert "00002.tar" in line and "not a regular file (a FIFO)" in line
    assert not (tmp_path / "run").exists()


def test_a_fifo_named_as_an_array_file_is_refused_without_blocking(tmp_path, preset, cli):
    os.mkfifo(tmp_path / "digits.npy")
    with within(60):
        ran = cli(*train_args(preset, tmp_path / "digits.npy", tmp_path / "run"))
    assert ran.exit_code == 2 and "digits.npy: not a regular file" in one_line(ran)


def test_a_shard_swapped_for_a_fifo_after_listing_is_not_opened_blocking(tmp_path):
    os.mkfifo(tmp_path / "late.tar")
    with within(10), pytest.raises(DataError, match=r"late.tar: not a regular file \(a FIFO\)"):
        index_shard(tmp_path / "late.tar", 0)


def test_a_fifo_among_streamed_images_is_named_and_skipped(tmp_path, preset):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        photo(i).save(root / f"{i}.jpg")
    os.mkfifo(root / "pipe.jpg")
    config = load_config(
        str(preset), ["data.stream=true", "data.workers=0", "data.val_fraction=0.5"]
    ).config
    with within(30):
        data = load_data(root, config.data, 0)
        read = [data.sample(i, None) for i in range(len(data.keys))]
    failures = [r for r in read if isinstance(r, Failure)]
    assert [Path(f.path).name for f in failures] == ["pipe.jpg"]
    assert failures[0].reason == "not a regular file"


# -- D8: a member larger than any image ---------------------------------------------------------


def write_sparse_shard(path: Path, claimed: int, tar_format: int) -> None:
    """A shard of two small samples around `big.jpg`, whose header claims `claimed` bytes over
    a hole in a sparse file: gigabytes in the header, a few kilobytes on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:

        def member(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.write(info.tobuf(tar_format))
            handle.write(data + bytes(-len(data) % 512))

        member("a.jpg", jpeg(photo(1)))
        big = tarfile.TarInfo("big.jpg")
        big.size = claimed
        handle.write(big.tobuf(tar_format))
        handle.seek(-(-claimed // 512) * 512, os.SEEK_CUR)  # a hole, never written
        for i in range(2, 8):
            member(f"{i}.jpg", jpeg(photo(i)))
        handle.write(bytes(1024))  # the end-of-archive blocks


@pytest.mark.parametrize(
    "claimed, tar_format",
    [(2 << 30, tarfile.USTAR_FORMAT), (9 << 30, tarfile.PAX_FORMAT)],  # read directly; by tarfile
    ids=["2GiB-ustar", "9GiB-pax"],
)
def test_a_huge_member_is_skipped_by_its_header_size_and_never_read(
    claimed, tar_format, tmp_path, monkeypatch
):
    shard = tmp_path / "shards" / "00000.tar"
    write_sparse_shard(shard, claimed, tar_format)
    assert os.stat(shard).st_blocks * 512 < 1 << 20  # sparse: nothing was written to disk
    largest = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: largest.append(n) or real(fd, n, at))
    config = streamed_config(tmp_path, ["data.val_max=1"]).data
    data = load_data(shard.parent, config, 0)
    samples = [data.sample(int(i), None) for i in data.train]
    assert not any(isinstance(s, Failure) for s in samples)
    assert sorted(data.keys) == sorted(f"00000.tar/{k}" for k in ["a", *map(str, range(2, 8))])
    assert data.skipped == [
        Failure(
            f"{shard}/big.jpg",
            f"member of {claimed:,} bytes, larger than any image aecli reads "
            f"({MAX_IMAGE_BYTES:,} bytes at most); never read",
        )
    ]
    assert max(largest) < 1 << 20  # headers and small images only


def test_a_huge_member_is_named_once_in_a_training_run(tmp_path, preset, cli):
    write_sparse_shard(tmp_path / "shards" / "00000.tar", 2 << 30, tarfile.USTAR_FORMAT)
    write_shards(tmp_path / "shards", 1, 8, start=1)
    ran = cli(*train_args(preset, tmp_path / "shards", tmp_path / "run", "--epochs", "2"))
    assert ran.exit_code == 0, ran.output
    assert ran.stderr.count("big.jpg") == 1 and "never read" in ran.stderr
    assert "shard ends inside" not in ran.stderr and "--batch-size" not in ran.stderr


def test_only_a_shard_really_cut_short_says_it_ends_inside_a_member(tmp_path, monkeypatch):
    shard = write_shards(tmp_path / "shards", 1, 6)[0]
    data = load_data(shard, streamed_config(tmp_path).data, 0)
    sample = int(data.train[-1])
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: real(fd, min(n, 100), at))  # short reads
    assert not isinstance(data.sample(sample, None), Failure)
    member = data.members[sample]
    with open(shard, "r+b") as handle:  # the shard cut inside that member since it was listed
        handle.truncate(member.offset + member.size // 2)
    failure = data.sample(sample, None)
    assert failure.reason == "shard ends inside this member"


# -- D4: a resume on data that changed -----------------------------------------------------------


def interrupted_run(tmp_path: Path, root: Path) -> Path:
    """A streamed run over `root` stopped by Ctrl-C in its second epoch (3 steps an epoch)."""
    config = streamed_config(tmp_path, ["train.epochs=3"])
    data = load_data(root, config.data, 0)
    reporter = StopAt(step=5)
    run = tmp_path / "run"
    trainer = trainer_in(
        config, data, run, preset="streamed", reporter=reporter, device="cpu", data_path=str(root)
    )
    reporter.trainer = trainer
    with pytest.raises(Interrupted):
        trainer.fit()
    return run


def test_a_resume_on_shards_that_changed_is_refused_then_accepted_with_a_flag(tmp_path, cli):
    root = tmp_path / "shards"
    write_shards(root, 4, 13)  # 52 samples
    before = load_data(root, streamed_config(tmp_path).data, 0)
    run = interrupted_run(tmp_path, root)
    state = load_checkpoint(run / "checkpoint.safetensors")["train_state"]
    assert (state["epoch"], state["batch"]) == (2, 2)
    (root / "00003.tar").unlink()
    after = load_data(root, streamed_config(tmp_path).data, 0)

    refused = cli("train", "--resume", run, "--device", "cpu")
    assert refused.exit_code == 2
    line = one_line(refused)
    assert f"{len(before)} training samples then, {len(after)} now" in line
    assert "--data-changed" in line
    assert json.loads((run / "state.json").read_text())["state"] == "interrupted"

    accepted = cli("train", "--resume", run, "--device", "cpu", "--data-changed", "--json")
    assert accepted.exit_code == 0, accepted.output
    warning = " ".join(accepted.stderr.split())
    assert f"{len(before)} training samples then, {len(after)} now" in warning
    assert "epoch 2 goes on at batch 3" in warning
    changed = set(before.held_out) != set(after.held_out)
    assert ("the validation set changed" in warning) == changed
    assert json.loads(accepted.stdout)["epochs"] == 3


def test_a_checkpoint_without_the_data_record_resumes_as_before(tmp_path, cli):
    root = tmp_path / "shards"
    write_shards(root, 3, 13)
    run = interrupted_run(tmp_path, root)
    checkpoint = load_checkpoint(run / "checkpoint.safetensors")
    assert checkpoint.pop("data")["train"]["count"] > 0
    save_checkpoint(run / "checkpoint.safetensors", checkpoint)  # as an earlier aecli wrote it
    (root / "00002.tar").unlink()
    ran = cli("train", "--resume", run, "--device", "cpu")
    assert ran.exit_code == 0, ran.output
    assert "data differ" not in ran.stderr


def test_an_in_memory_folder_that_lost_an_image_is_refused_on_resume(tiny_preset, tmp_path, cli):
    root = tmp_path / "images"
    for i in range(40):
        write_image(root / f"{i:02d}.png", seed=i)
    run = tmp_path / "run"
    ran = cli("train", tiny_preset, "--data", root, "--out", run, "--device", "cpu")
    assert ran.exit_code == 0, ran.output
    (root / "07.png").unlink()
    refused = cli("train", "--resume", run, "--epochs", "3", "--device", "cpu")
    assert refused.exit_code == 2
    assert "training samples then" in one_line(refused)


def test_data_changed_goes_with_resume(tmp_path, preset, cli):
    ran = cli("train", preset, "--out", tmp_path / "run", "--data-changed")
    assert ran.exit_code == 2 and "--data-changed goes with --resume" in one_line(ran)


# -- D14: an emptied data folder ----------------------------------------------------------------


def test_an_empty_data_folder_is_named_with_every_form_it_could_take(tmp_path, preset, cli):
    (tmp_path / "empty").mkdir()
    ran = cli(*train_args(preset, tmp_path / "empty", tmp_path / "run"))
    assert ran.exit_code == 2
    line = one_line(ran)
    assert "no images found" in line and "WebDataset .tar shards" in line
    assert line.count("(") == line.count(")")


# -- the progress bar ---------------------------------------------------------------------------


class ShownProgress(RichReporter):
    """The bar as it stands after each call, on a clock that ticks a second a step."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.progress.get_time = lambda: self.now
        self.shown: list[tuple[int, str, str]] = []  # (epoch, M/N, elapsed) after each step
        self.epoch_ends: list[tuple[str, str]] = []  # (M/N, elapsed) as each epoch ends

    def bar(self) -> tuple[str, str]:
        task = self.progress.tasks[0]
        clock = next(c for c in self.progress.columns if isinstance(c, RunTimeColumn))
        return f"{task.completed:g}/{task.total:g}", clock.render(task).plain

    def step(self, *, epoch, step, metrics) -> None:
        self.now += 1
        super().step(epoch=epoch, step=step, metrics=metrics)
        self.shown.append((epoch, *self.bar()))

    def epoch(self, record) -> None:
        self.epoch_ends.append(self.bar())
        super().epoch(record)


def test_the_bar_counts_every_step_and_its_clock_runs_for_the_whole_run(tiny_preset, tmp_path):
    # 3 steps an epoch, fewer than log_every's 10: each epoch used to sit at 0/3
    config = load_config(str(tiny_preset), ["train.epochs=3"]).config
    data = load_data(None, config.data, config.train.seed)
    reporter = ShownProgress()
    train(config, data, tmp_path / "run", preset="tiny", device="cpu", reporter=reporter)
    assert [(e, m) for e, m, _ in reporter.shown] == [
        (e, f"{s}/3") for e in (1, 2, 3) for s in (1, 2, 3)
    ]
    assert reporter.epoch_ends == [("3/3", "0:00:03"), ("3/3", "0:00:06"), ("3/3", "0:00:09")]
    # after the last epoch (while the latent statistics are gathered) the bar stays full, at the
    # last epoch, instead of starting an epoch that will not come
    task = reporter.progress.tasks[0]
    assert (task.fields["epoch"], task.completed) == (3, 3)

"""Hostile round four on encode, latent folders and tiles (issue 45): a user's own files under
aecli's names, resumes that would mix two encodes, images too small for the model, tiles too
small to be worth it, a folder in use, Ctrl-C, and the labels `info` and `diff --vs` print."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from conftest import folder_held, one_line, write_image

import aecli.io.latent_folder as latent_folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def images(tmp_path) -> Path:
    """Six 16x16 pictures (three units of two)."""
    root = tmp_path / "imgs"
    for i in range(6):
        write_image(root / f"{i}.png", seed=i)
    return root


def interrupted(cli, monkeypatch, *args, after: int = 1):
    """`aecli encode ARGS` as Ctrl-C leaves it after `after` units are on disk (sys.argv as the
    shell gives it, for the resume command the message prints)."""
    real = latent_folder.FolderWriter.write_unit
    written = []

    def write_unit(self, unit, parts, failures):
        if len(written) == after:
            raise KeyboardInterrupt
        written.append(unit)
        return real(self, unit, parts, failures)

    monkeypatch.setattr(sys, "argv", ["aecli", "encode", *map(str, args)])
    with monkeypatch.context() as patch:
        patch.setattr(latent_folder.FolderWriter, "write_unit", write_unit)
        return cli("encode", *args)


# -- D1: a user's own index.json, encode.json, ... is a foreign file --------------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("index.json", b'{"name":"my app"}\n'),
        ("encode.json", b'{"name":"my app"}\n'),
        ("unit-000000.json", b'{"todo": []}\n'),
        ("latents-000000.safetensors", b"my own bytes, not a latent file"),
        (".aecli-encode.lock", b"my notes\n"),
    ],
)
def test_a_users_file_under_an_aecli_name_is_never_replaced(
    tiny_weights, images, tmp_path, cli, name, content
):
    mine = tmp_path / "u"
    mine.mkdir()
    (mine / name).write_bytes(content)
    before = sha256(mine / name)
    for extra in ([], ["--overwrite"], ["--resume"]):
        result = cli("encode", tiny_weights, images, "-o", f"{mine}/", *extra)
        assert result.exit_code == 2, result.output
        assert f"holds files aecli did not write ({name})" in one_line(result)
    assert sorted(os.listdir(mine)) == [name] and sha256(mine / name) == before


def test_a_link_under_an_aecli_name_is_foreign(tiny_weights, images, tmp_path, cli):
    target = tmp_path / "mine.json"
    target.write_text('{"format": "aecli-latent-folder"}')
    folder = tmp_path / "u"
    folder.mkdir()
    (folder / "index.json").symlink_to(target)
    result = cli("encode", tiny_weights, images, "-o", folder, "--overwrite")
    assert result.exit_code == 2 and "did not write (index.json)" in one_line(result)
    assert (folder / "index.json").is_symlink() and target.exists()


def test_a_finished_folder_is_still_aecli_s_own(tiny_weights, images, tmp_path, cli):
    out = tmp_path / "z"
    assert cli("encode", tiny_weights, images, "-o", out, "--shard-size", 2).exit_code == 0
    result = cli("encode", tiny_weights, images, "-o", out, "--shard-size", 2, "--overwrite")
    assert result.exit_code == 0, result.output  # every file in it is recognised as aecli's


# -- D13: a name that is not a latent file's is a folder -------------------------------------


def test_an_existing_text_file_is_never_overwritten_with_latents(
    tiny_weights, images, tmp_path, cli
):
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    before = sha256(notes)
    for extra in ([], ["--overwrite"]):
        result = cli("encode", tiny_weights, images, "-o", notes, *extra)
        assert result.exit_code == 2
        assert f"-o {notes}: exists and is not a folder" in one_line(result)
    assert sha256(notes) == before
    result = cli("encode", tiny_weights, images, "-o", tmp_path / "z.bin")
    assert result.exit_code == 0 and (tmp_path / "z.bin" / "index.json").is_file()
    result = cli("encode", tiny_weights, images, "-o", tmp_path / "z.NPY")
    assert result.exit_code == 0 and (tmp_path / "z.NPY").is_file()


# -- Ctrl-C, and D12: a folder in use names its process --------------------------------------


def test_ctrl_c_keeps_the_finished_units_and_prints_the_command_that_resumes(
    tiny_weights, images, tmp_path, cli, monkeypatch
):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [tiny_weights, images, "--shard-size", 2, "--workers", 0]
    assert cli("encode", *args, "-o", whole).exit_code == 0
    result = interrupted(cli, monkeypatch, *args, "-o", cut, "--overwrite")
    assert result.exit_code == 130
    line = one_line(result)
    assert line.startswith("interrupted: 1 of 3 units of work are on disk in ")
    command = line.split("continue with: ", 1)[1]
    assert "--overwrite" not in command and command.endswith(" --resume")
    words = shlex.split(command)
    assert words[:2] == ["aecli", "encode"]
    assert cli(*words[1:]).exit_code == 0
    index, expected = (json.loads((f / "index.json").read_text()) for f in (cut, whole))
    assert index["count"] == 6 and index["shards"] == expected["shards"]


def test_a_folder_an_encode_is_writing_names_its_process_everywhere(
    tiny_weights, images, tmp_path, cli, monkeypatch
):
    out = tmp_path / "busy"
    args = [tiny_weights, images, "--shard-size", 2, "--workers", 0, "-o", out]
    assert interrupted(cli, monkeypatch, *args).exit_code == 130
    with folder_held(out / ".aecli-encode.lock") as pid:  # a live encode in another process
        named = f"(process {pid}); wait for it to finish"
        for command in (
            ["encode", *args],
            ["encode", *args, "--resume"],
            ["decode", tiny_weights, out, "-o", tmp_path / "d"],
        ):
            result = cli(*command)
            line = one_line(result)
            assert result.exit_code == 2 and named in line and "--resume" not in line, line
        result = cli("info", out)
        assert result.exit_code == 0 and named in " ".join(result.output.split())
        assert "--resume" not in result.output
        facts = json.loads(cli("info", out, "--json").stdout)
        assert facts["writer"] == pid and not facts["finished"]
    assert cli("encode", *args, "--resume").exit_code == 0  # free again


# -- D2 and D11: tiling settings are part of an encode; tiles too small are refused -----------


def test_a_resume_with_other_tiling_is_refused_naming_the_option(
    conv_weights, images, tmp_path, cli, monkeypatch
):
    out = tmp_path / "z"
    args = [conv_weights, images, "--shard-size", 2, "--workers", 0, "-o", out]
    assert interrupted(cli, monkeypatch, *args, "--tile", 16).exit_code == 130
    plan = json.loads((out / "encode.json").read_text())
    assert plan["settings"]["tile"] == 16 and plan["settings"]["tile_fast"] is False
    for extra, said in (
        (["--tile", 16, "--tile-fast"], "was encoded without --tile-fast, this command with it"),
        (["--tile", 32], "was encoded with --tile 16, this command gives 32"),
        ([], "was encoded with --tile 16, this command gives not set"),
    ):
        result = cli("encode", *args, "--resume", *extra)
        assert result.exit_code == 2 and said in one_line(result)
    assert cli("encode", *args, "--resume", "--tile", 16).exit_code == 0
    index = json.loads((out / "index.json").read_text())
    assert index["settings"]["tile"] == 16 and index["count"] == 6


def test_exact_tiles_smaller_than_their_context_are_refused(conv_weights, images, tmp_path, cli):
    # the tiny model's stages see 8 pixels across: exact tiles of at least 16
    result = cli("reconstruct", conv_weights, images, "-o", tmp_path / "r", "--tile", 8)
    line = one_line(result)
    assert result.exit_code == 2 and line.startswith("error: --tile 8: exact tiles this small")
    assert "give at least --tile 16, or --tile-fast" in line
    assert not (tmp_path / "r").exists()
    fast = ["--tile", 8, "--tile-fast"]
    assert cli("reconstruct", conv_weights, images, "-o", tmp_path / "f", *fast).exit_code == 0
    exact = cli("reconstruct", conv_weights, images, "-o", tmp_path / "e", "--tile", 16)
    assert exact.exit_code == 0 and len(list((tmp_path / "e").glob("*.png"))) == 6


# -- D3: a resume with other inputs ------------------------------------------------------------


def test_a_resume_with_other_pictures_under_the_same_names_is_refused(
    tiny_weights, images, tmp_path, cli, monkeypatch
):
    other = tmp_path / "other"
    for i in range(6):
        write_image(other / f"{i}.png", seed=100 + i)
    out = tmp_path / "z"
    options = ["--shard-size", 2, "--workers", 0, "-o", out]
    assert interrupted(cli, monkeypatch, tiny_weights, images, *options, after=2).exit_code == 130
    result = cli("encode", tiny_weights, other, *options, "--resume")
    line = one_line(result)
    assert result.exit_code == 2
    assert f"was started with the inputs {images}, this command gives {other}" in line
    # the same folder, but a picture that a finished unit encoded was replaced
    replaced = images / "1.png"
    then = replaced.stat()
    write_image(replaced, seed=99)
    os.utime(replaced, ns=(1, 1))
    result = cli("encode", tiny_weights, images, *options, "--resume")
    line = one_line(result)
    assert result.exit_code == 2 and f"{replaced} is not the file {out} was started with" in line
    # a picture no finished unit holds yet may change: it is encoded now
    write_image(replaced, seed=1)
    os.utime(replaced, ns=(then.st_atime_ns, then.st_mtime_ns))
    write_image(images / "5.png", seed=98)
    assert cli("encode", tiny_weights, images, *options, "--resume").exit_code == 0
    assert json.loads((out / "index.json").read_text())["roots"] == [str(images)]


# -- D6: an image too small for the model -------------------------------------------------------

# Fully convolutional, with a GroupNorm of one channel per group at the latent: a 1x1 picture
# (padded to 4x4, a 1x1 latent) gives it one value per group; 5x5 (padded to 8x8) is the least.
ONE_PER_GROUP = """\
data: {image_size: 16, channels: 3}
model:
  encoder:
    - {type: conv, out: 8, stride: 2, act: relu}
    - {type: conv, out: 8, stride: 2, norm: group, groups: 8, act: relu}
  latent: {channels: 2, variational: true}
  decoder:
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv_transpose, out: 8, stride: 2, act: relu}
    - {type: conv, out: 3}
"""


@pytest.fixture(scope="module")
def group_weights(tmp_path_factory) -> Path:
    import torch

    from aecli.config import config_from_dict
    from aecli.io.weights import save_weights
    from aecli.models import build_model

    config = config_from_dict(yaml.safe_load(ONE_PER_GROUP), "one-per-group")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("group") / "model.safetensors"
    save_weights(
        path, build_model(config), config, preset="t", data={}, class_names=None, metrics={}
    )
    return path


def test_an_image_too_small_for_the_model_fails_alone(group_weights, tmp_path, cli):
    pictures = tmp_path / "in"
    write_image(pictures / "one.png", size=(1, 1))
    write_image(pictures / "a.png", seed=1)
    write_image(pictures / "b.png", size=(16, 16), seed=2)
    said = f"failed: {pictures / 'one.png'}: too small for this model (1x1; at least 5x5)"
    native = ["encode", group_weights, pictures, "--size", "native", "-o"]
    runs = {
        "reconstruct": ["reconstruct", group_weights, pictures, "-o", tmp_path / "r"],
        "encode to a file": [*native, tmp_path / "z.safetensors"],
        "encode to a folder": [*native, tmp_path / "zs"],
        "diff": ["diff", group_weights, pictures, "--json"],
    }
    for what, args in runs.items():
        result = cli(*args)
        assert result.exit_code == 1, (what, result.output)
        assert said in " ".join(result.stderr.split()), what
        assert "internal error" not in result.output, what
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["a.png", "b.png"]
    folder = json.loads((tmp_path / "zs" / "index.json").read_text())
    assert folder["count"] == 2 and folder["failures"][0]["reason"].startswith("too small")
    result = cli("reconstruct", group_weights, pictures / "one.png", "-o", tmp_path / "one.png")
    assert result.exit_code == 1 and not (tmp_path / "one.png").exists()
    result = cli("encode", group_weights, pictures, "--size", "2x2", "-o", tmp_path / "y.npy")
    assert result.exit_code == 2
    assert "--size 2x2: too small for this model (at least 5x5)" in one_line(result)


# -- labels ------------------------------------------------------------------------------------


def test_info_names_a_plain_autoencoders_latents_and_counts_one_shard(
    tiny_weights, images, conv_weights, tmp_path, cli
):
    plain, vae = tmp_path / "plain", tmp_path / "vae"
    assert cli("encode", tiny_weights, images, "-o", plain).exit_code == 0
    text = " ".join(cli("info", plain).output.split())
    assert "6 in 1 shard " in text and "1 shards" not in text
    assert "the encoder's output" in text and "posterior" not in text
    assert cli("encode", conv_weights, images, "-o", vae, "--shard-size", 2).exit_code == 0
    text = " ".join(cli("info", vae).output.split())
    assert "6 in 3 shards" in text and "a VAE's posterior mean" in text


def test_the_diff_vs_sheet_header_is_readable():
    from PIL import ImageFont

    from aecli.inference.diff import SHEET_TILE, sheet_header

    header = sheet_header(True, 0.25)
    assert header[3:] == ["|error| weights 0-0.25", "|error| vs 0-0.25"]
    font = ImageFont.load_default()
    assert all(font.getlength(label) < SHEET_TILE for label in header)  # no label runs on


# -- D5: the docs say what holds between process counts ----------------------------------------


def test_the_docs_do_not_promise_byte_identical_folders_across_process_counts():
    text = " ".join((Path(__file__).parent.parent / "docs" / "using.md").read_text().split())
    torchrun = text[text.index("**torchrun.**") :][:1200]
    assert "float32 rounding" in torchrun and "same number of threads" in torchrun
    assert "equals a single-process run's byte for byte on the CPU" not in torchrun


# -- sparse files where a latent folder's files go: refused before they are read ---------------


def test_a_shard_or_index_of_a_gigabyte_of_nul_bytes_is_refused_unread(
    tiny_weights, images, tmp_path, cli
):
    """A shard replaced by a sparse gigabyte (what a crash on some file systems leaves, or a
    hostile file) is refused by its size against the index, naming it, before it is read; an
    index.json of NUL bytes is refused at its first chunk. Neither costs memory."""
    import tracemalloc

    from aecli.io.jsonfile import read_json_file

    folder = tmp_path / "lat"
    assert cli("encode", tiny_weights, images, "-o", folder, "--shard-size", "2").exit_code == 0
    shard = folder / "latents-000001.safetensors"
    shard.unlink()
    with shard.open("wb") as handle:
        handle.truncate(1 << 30)
    tracemalloc.start()
    try:
        result = cli("decode", tiny_weights, folder, "-o", tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 2
    assert "latents-000001.safetensors: 1,073,741,824 bytes, the index says" in one_line(result)
    assert peak < 64 << 20
    sparse = tmp_path / "index.json"
    with sparse.open("wb") as handle:
        handle.truncate(1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="damaged: a NUL byte at byte 0"):
            read_json_file(sparse, 4 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20

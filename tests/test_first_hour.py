"""The rough edges of a new user's first hour (issue 35)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer

import aecli


def test_sigint_is_restored_after_an_interrupted_command():
    """A command that ends interrupted ignores Ctrl-C while it reports, then puts back the
    handler it found: a process that ran one (a test run) can still be stopped with Ctrl-C."""
    from aecli.cli.app import guarded
    from aecli.errors import Interrupted

    @guarded
    def stops() -> None:
        raise Interrupted("saved; continue with aecli train --resume runs/x")

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(typer.Exit):
        stops()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flags_match_the_changelog(flag):
    ran = subprocess.run([sys.executable, "-m", "aecli", flag], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout.strip() == f"aecli {aecli.__version__}"
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    assert f"## [{aecli.__version__}]" in changelog


def test_o_png_is_one_image_file_for_every_command(tiny_weights, tmp_path, cli):
    """`-o x.png` means one image file: reconstruct writes the one input's reconstruction there
    (several inputs are refused, naming the folder and --grid alternatives); a decoded or
    sampled single latent is the image itself, not a one-cell sheet with a border."""
    from conftest import one_line, write_image
    from PIL import Image

    image = tmp_path / "a.png"
    write_image(image)
    out = tmp_path / "a-recon.png"
    assert cli("reconstruct", tiny_weights, image, "-o", out).exit_code == 0
    assert out.is_file() and Image.open(out).size == (16, 16)
    result = cli("reconstruct", tiny_weights, image, image.parent, "-o", tmp_path / "two.png")
    assert result.exit_code == 2
    assert f"give a folder (-o {tmp_path / 'two'}/)" in one_line(result)
    assert not (tmp_path / "two.png").exists()
    latent = tmp_path / "z.safetensors"
    assert cli("encode", tiny_weights, image, "-o", latent).exit_code == 0
    assert cli("decode", tiny_weights, latent, "-o", tmp_path / "b.png").exit_code == 0
    decoded = Image.open(tmp_path / "b.png")
    assert decoded.size == (16, 16)
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(out)))
    assert (
        cli("sample", tiny_weights, "-n", 1, "--seed", 1, "-o", tmp_path / "s.png").exit_code == 0
    )
    assert Image.open(tmp_path / "s.png").size == (16, 16)


def test_messages_say_what_was_understood(tiny_weights, tmp_path, cli):
    """A missing folder is not an 'unknown preset'; a lone folder given to reconstruct is named
    as taken for the WEIGHTS."""
    from conftest import one_line

    result = cli("info", tmp_path / "sd-vae-ft-mse/")
    assert result.exit_code == 2 and "not found" in one_line(result)
    assert "preset" not in one_line(result)
    result = cli("info", "sd-vae-ft-mse")
    assert "and no file or folder of that name here" in one_line(result)
    ran = subprocess.run(
        [sys.executable, "-m", "aecli", "reconstruct", str(tmp_path), "-o", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ran.returncode == 2
    assert f"no INPUT given: {tmp_path} was taken as the WEIGHTS" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["train", "missing.yaml", "--device", "cuda"],
        ["train", "--data", "no-such-folder/"],
        ["train", "--set", "model.latent.dimm=3"],
        ["reconstruct", "no-such.safetensors", "a.png", "-o", "out/"],
        ["encode", "no-such.safetensors", "a.png", "-o", "z.safetensors", "--device", "gpu"],
        ["info", "no-such-folder/"],
        ["sample", "no-such.safetensors", "-n", "2", "-o", "s.png"],
    ],
)
def test_what_can_be_checked_without_torch_fails_before_torch_loads(args, tmp_path):
    """A wrong path, preset, key or device is answered without importing torch (seconds on a
    small machine): the one-line refusal comes from a process that never loaded it."""
    probe = (
        "import sys\nfrom aecli.cli import main\n"
        f"sys.argv = ['aecli', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n"
        "    print('torch' in sys.modules, exit.code, file=sys.__stdout__)\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path)  # fmt: skip
    assert ran.stdout.split() == ["False", "2"], ran.stdout + ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1


def test_help_reads_well_at_80_columns():
    """Examples one per line, never rewrapped (each fits 80 columns); values shown as N, X,
    PATH or their choices, never <bool> or <int range>; no 20-digit seed range; train first."""
    import os

    env = {**os.environ, "COLUMNS": "80"}
    top = subprocess.run([sys.executable, "-m", "aecli", "--help"], capture_output=True,
                         text=True, env=env).stdout  # fmt: skip
    commands = top.split("Commands:")[1].split()
    assert commands[0] == "train"
    for name in ("train", "reconstruct", "encode", "decode", "sample", "interpolate", "diff",
                 "stats", "export", "presets", "info", "runs", "report"):  # fmt: skip
        text = subprocess.run([sys.executable, "-m", "aecli", name, "--help"],
                              capture_output=True, text=True, env=env).stdout  # fmt: skip
        options = text.split("Options:")[1].split("Examples:")[0]
        assert not re.search(r"<[a-z]", options), name  # <bool>, <str>, <int range>, <path>
        assert "18446744073709551615" not in text and "[bold]" not in text
        assert all(len(line) <= 80 for line in text.splitlines()), name
        examples = text.split("Examples:")[1].strip().splitlines() if "Examples:" in text else []
        assert all(line.strip().startswith(("aecli ", "torchrun ")) for line in examples), name


def test_preset_names_complete_in_the_shell(tmp_path):
    import os

    executable = Path(sys.executable).parent / "aecli"  # completion goes by the program's name
    if not executable.is_file():
        pytest.skip("needs the aecli executable next to this Python")
    (tmp_path / "tiny.yaml").write_text("data: {}\n")
    env = {**os.environ, "_AECLI_COMPLETE": "complete_bash", "COMP_CWORD": "2"}
    for words, expected in (("aecli train ci", ["cifar-cae", "cifar-cae-1000", "cifar-res"]),
                            ("aecli info ti", ["tiny.yaml"])):  # fmt: skip
        ran = subprocess.run([str(executable)], capture_output=True, text=True,
                             env={**env, "COMP_WORDS": words}, cwd=tmp_path)  # fmt: skip
        assert ran.stdout.split() == expected, ran.stderr


@pytest.mark.parametrize("reported", [True, False])
def test_a_ctrl_c_outside_a_command_exits_130_without_a_traceback(monkeypatch, capsys, reported):
    """A second Ctrl-C that lands as an interrupted command returns (after it restored the
    handler) reaches main() as KeyboardInterrupt: exit 130, no traceback, and no second
    `interrupted` line where the command has said it; one Ctrl-C while the command line is
    read says `interrupted` once."""
    import importlib

    cli_module = importlib.import_module("aecli.cli")
    app_module = importlib.import_module("aecli.cli.app")  # the module, not the Typer app

    def stopped(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "app", stopped)
    monkeypatch.setitem(app_module._state, "interrupted", reported)
    monkeypatch.setattr(sys, "argv", ["aecli", "runs"])
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as ended:
            cli_module.main()
    finally:
        signal.signal(signal.SIGINT, before)
    assert ended.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("interrupted") == (0 if reported else 1)

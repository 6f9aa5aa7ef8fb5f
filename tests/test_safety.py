"""Nothing a user owns is lost or garbled: outputs never land on inputs, files get normal modes,
OS errors and doctored files are one line, decoders stay quiet, results go to stdout."""

import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import AECLI, one_line, shell, write_image
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from aecli.io.tensorfile import safetensors_header

# -- outputs never land on inputs ---------------------------------------------------------------


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "in" / "a.png"
    write_image(path, seed=3)
    return path


@pytest.fixture
def model_copy(tmp_path, tiny_weights) -> Path:
    """A copy of the tiny weights that a test may try to destroy."""
    path = tmp_path / "models" / "w.safetensors"
    path.parent.mkdir()
    path.write_bytes(tiny_weights.read_bytes())
    return path


@pytest.mark.parametrize(
    "command",
    [
        "encode {w} {img} -o {w}",
        "sample {w} -n 2 --latents-out {w}",
        "sample {w} -n 2 -o {w}.png --latents-out {w}",
        "reconstruct {w} {img} --grid {w}",
        "diff {w} {img} --vs {v} -o {v}",
        "interpolate {w} {img} {img} -o {img}",
    ],
)
def test_no_output_may_be_an_input_even_with_overwrite(
    command, model_copy, other_weights, picture, tmp_path, cli
):
    other = tmp_path / "models" / "v.safetensors"
    other.write_bytes(other_weights.read_bytes())
    before = {p: p.read_bytes() for p in (model_copy, other, picture)}
    args = command.format(w=model_copy, v=other, img=picture).split()
    result = cli(*args, "--overwrite")
    assert result.exit_code == 2
    assert "is one of this command's inputs" in one_line(result)
    assert {p: p.read_bytes() for p in before} == before


def test_two_outputs_may_not_share_a_path(tiny_weights, picture, tmp_path, cli):
    out = tmp_path / "x.png"
    result = cli("interpolate", tiny_weights, picture, picture, "-o", out, "--gif", out)
    assert result.exit_code == 2 and "also the output of -o" in one_line(result)
    assert not out.exists()
    z = tmp_path / "z.png"
    result = cli("sample", tiny_weights, "-n", 2, "-o", z, "--latents-out", z)
    assert result.exit_code == 2 and "also the output of -o" in one_line(result)
    assert not z.exists()


def test_outputs_inside_an_input_folder_are_refused(tiny_weights, picture, cli):
    sheet = picture.parent / "sheet.png"
    result = cli("diff", tiny_weights, picture.parent, "-o", sheet)
    assert result.exit_code == 2 and "inside the input folder" in one_line(result)
    assert not sheet.exists()


def test_train_out_inside_its_data_is_refused(tmp_path, cli):
    data = tmp_path / "photos"
    for i in range(4):
        write_image(data / f"{i}.png", seed=i)
    for out in (data, data / "run"):
        result = cli("train", "--data", data, "--out", out, "--epochs", 1)
        assert result.exit_code == 2 and "inside the data folder" in one_line(result)
    assert sorted(p.name for p in data.iterdir()) == ["0.png", "1.png", "2.png", "3.png"]


# -- file modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_s_mode(umask, tiny_preset, picture, tmp_path, cli):
    previous = os.umask(umask)
    try:
        run = tmp_path / "run"
        assert cli("train", tiny_preset, "--out", run, "--epochs", 1).exit_code == 0
        weights = run / "model.safetensors"
        z, recon = tmp_path / "z.safetensors", tmp_path / "recon"
        assert cli("encode", weights, picture, "-o", z).exit_code == 0
        assert cli("reconstruct", weights, picture, "-o", recon).exit_code == 0
    finally:
        os.umask(previous)
    written = [
        weights,
        run / "checkpoint.safetensors",
        run / "config.yaml",
        run / "grids" / "epoch-0001.png",
        z,
        recon / "a.png",
    ]
    expected = 0o666 & ~umask
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {
        p.name: oct(expected) for p in written
    }


# -- OS errors are one line ---------------------------------------------------------------------


def test_unusable_output_paths_are_one_line_before_any_work(tiny_weights, picture, tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # --data holds no images: --out is checked first, before any data loads
    (tmp_path / "empty").mkdir()
    result = cli("train", "--out", blocker / "run", "--data", tmp_path / "empty")
    assert result.exit_code == 2
    assert f"{blocker} is a file, not a folder" in one_line(result)
    result = cli("encode", tiny_weights, picture, "-o", blocker / "z.safetensors")
    assert result.exit_code == 2 and "a-file: exists and is not a folder" in one_line(result)
    if Path("/proc/self").is_dir():
        result = cli("train", "--out", "/proc/aecli-run", "--data", tmp_path / "empty")
        assert result.exit_code == 2 and "--out /proc/aecli-run: cannot create" in one_line(result)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_names_the_file(tiny_weights, tmp_path, cli, monkeypatch):
    """Writes go to /dev/full, where the kernel answers ENOSPC as on a full disk."""
    import aecli.io.atomic as atomic

    create = atomic._create

    def on_a_full_disk(path):
        fd, tmp = create(path)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp

    monkeypatch.setattr(atomic, "_create", on_a_full_disk)
    z = tmp_path / "z.safetensors"
    result = cli("sample", tiny_weights, "-n", 2, "--latents-out", z)
    assert result.exit_code == 1
    assert f"{z}: cannot write: No space left on device" in one_line(result)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_bad_numbers_and_texts_are_usage_errors(tiny_weights, tmp_path, cli):
    preset = tmp_path / "latin1.yaml"
    preset.write_bytes("# café\ndata: {image_size: 16}\n".encode("latin-1"))
    result = cli("train", preset, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "not UTF-8 text" in one_line(result)
    result = cli("sample", tiny_weights, "-n", 2, "-o", tmp_path / "s.png", "--seed", 10**24)
    assert result.exit_code == 2 and "internal error" not in result.output
    result = cli("sample", tiny_weights, "-n", 10**12, "-o", tmp_path / "s.png")
    assert result.exit_code == 2 and "more than the" in one_line(result)
    result = cli("sample", tiny_weights, "-o", tmp_path / "t.png", "--temperature", "inf")
    assert result.exit_code == 2 and "must be a finite number" in one_line(result)
    result = cli("sample", tiny_weights, "-o", tmp_path / "t.png", "--temperature", "nan")
    assert result.exit_code == 2 and "internal error" not in result.output
    assert not list(tmp_path.glob("*.png"))


# -- doctored weights ---------------------------------------------------------------------------


def doctor(source: Path, target: Path, *, config=None, metadata=None, tensors=None) -> Path:
    """A copy of a weights file with its stored config, metadata or tensors changed."""
    with safe_open(str(source), "pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        meta = dict(handle.metadata())
    if config is not None:
        raw = json.loads(meta["config"])
        config(raw)
        meta["config"] = json.dumps(raw)
    meta.update(metadata or {})
    if tensors is not None:
        tensors(stored)
    save_file(stored, str(target), metadata=meta)
    return target


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_a_config_asking_for_huge_layers_is_refused_without_allocating(tiny_weights, tmp_path):
    def huge_latent(raw):
        raw["model"]["latent"]["dim"] = 8_000_000  # two linear layers of a billion weights each

    path = doctor(tiny_weights, tmp_path / "huge.safetensors", config=huge_latent)
    # aecli in a process of its own that reports its peak memory (VmHWM, KiB) as it exits
    # (not ru_maxrss: on Linux it counts the forking parent's memory too)
    measured = (
        "import sys\nfrom aecli.cli import main\ntry:\n    main()\nfinally:\n"
        "    status = open('/proc/self/status').read()\n"
        "    sys.stdout.write(status.split('VmHWM:')[1].split()[0])"
    )
    ran = subprocess.run(
        [sys.executable, "-c", measured, "info", str(path)], capture_output=True, text=True
    )
    assert ran.returncode == 2 and "wrong shape for" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1
    assert int(ran.stdout) < 1_500_000  # well under the 8 GB the two layers would take

    def enormous(raw):
        raw["model"]["latent"]["dim"] = 300_000_000  # 77 billion weights

    path = doctor(tiny_weights, tmp_path / "enormous.safetensors", config=enormous)
    ran = subprocess.run(
        [sys.executable, "-c", measured, "info", str(path)], capture_output=True, text=True
    )
    assert ran.returncode == 2 and "more than aecli loads" in ran.stderr
    assert int(ran.stdout) < 1_500_000


def test_doctored_headers_are_named_precisely(tiny_weights, tmp_path, cli):
    version = doctor(tiny_weights, tmp_path / "v99.safetensors", metadata={"format_version": "99"})
    result = cli("reconstruct", version, tmp_path, "-o", tmp_path / "o")
    assert result.exit_code == 2 and "format version '99'" in one_line(result)

    missing = doctor(
        tiny_weights, tmp_path / "missing.safetensors", tensors=lambda t: t.pop(next(iter(t)))
    )
    result = cli("info", missing)
    assert result.exit_code == 2 and "missing" in one_line(result)

    def reshape(tensors):
        name = next(k for k in tensors if k.endswith("weight"))
        tensors[name] = tensors[name].flatten()

    wrong = doctor(tiny_weights, tmp_path / "wrong.safetensors", tensors=reshape)
    result = cli("info", wrong)
    assert result.exit_code == 2 and "wrong shape for" in one_line(result)

    # an offset past the end of the file: damaged, not "a pickle"
    data = bytearray(tiny_weights.read_bytes())
    header, length = safetensors_header(bytes(data))
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + length :]))
    result = cli("info", past)
    assert result.exit_code == 2
    line = one_line(result)
    assert "lies outside the file" in line and "pickle" not in line


def test_a_run_folder_given_as_weights_is_read_as_its_weights(tiny_weights, tmp_path, cli):
    """`aecli info runs/x` and every command taking WEIGHTS read the run's model.safetensors;
    a folder that is neither a run nor a diffusers VAE is one line saying so."""
    import json

    run = tiny_weights.parent
    from_run = json.loads(cli("info", run, "--json").stdout)
    from_file = json.loads(cli("info", tiny_weights, "--json").stdout)
    assert from_run["fingerprint"] == from_file["fingerprint"]
    assert cli("sample", run, "-n", 2, "--seed", 1, "-o", tmp_path / "s.png").exit_code == 0
    (tmp_path / "empty").mkdir()
    result = cli("info", tmp_path / "empty")
    assert result.exit_code == 2 and "neither a run directory" in one_line(result)


# -- decoders stay quiet ------------------------------------------------------------------------


def broken_deflate_tiff(path: Path) -> None:
    """A deflate TIFF whose compressed strip is damaged: libtiff complains on stderr."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "TIFF", compression="tiff_adobe_deflate")
    data = bytearray(buffer.getvalue())
    (offset,), (count,) = Image.open(buffer).tag_v2[273], Image.open(buffer).tag_v2[279]
    for i in range(offset + 2, offset + count, 7):
        data[i] ^= 0x5A
    path.write_bytes(data)


def tiff_with_an_oversized_tag(path: Path) -> None:
    """A readable TIFF whose description tag claims more bytes than the file: Pillow warns."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buffer, "TIFF", description="x" * 100)
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 270:
            data[entry + 4 : entry + 8] = struct.pack("<I", 10**6)
    path.write_bytes(data)


def test_decoder_messages_are_folded_into_one_line_per_file(tiny_weights, tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "good.png")
    broken_deflate_tiff(photos / "broken.tif")
    tiff_with_an_oversized_tag(photos / "noisy.tif")
    samples = photos / "samples.tif"  # Pillow logs an error before refusing it
    tiff_with_an_oversized_tag(samples)
    data = bytearray(samples.read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 277:  # SamplesPerPixel
            data[entry + 8 : entry + 10] = struct.pack("<H", 4000)
    samples.write_bytes(data)
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        ran = shell(
            f'{AECLI} reconstruct "{tiny_weights}" "{photos}" -o "{out}" --workers {workers}'
        )
        assert ran.returncode == 1
        lines = ran.stderr.strip().splitlines()
        failed = sorted(line for line in lines if line.startswith("failed:"))
        # some Pillow versions read noisy.tif with a warning (folded away), others refuse it
        noisy_failed = any("noisy.tif" in line for line in failed)
        assert len(failed) == 2 + noisy_failed, ran.stderr
        assert len(lines) == len(failed) + 1, ran.stderr  # one line each, and the summary
        assert "broken.tif: cannot decode" in failed[0] and "ZIPDecode" in failed[0]
        assert "samples.tif" in failed[-1]
        written = ["good.png"] + ([] if noisy_failed else ["noisy.png"])
        assert sorted(p.name for p in out.iterdir()) == written


def test_a_complex_npy_is_one_line(tiny_weights, tmp_path):
    z = tmp_path / "z.npy"
    np.save(z, np.ones((2, 8), np.complex64))
    ran = shell(f'{AECLI} decode "{tiny_weights}" "{z}" -o "{tmp_path / "out"}"')
    assert ran.returncode == 2
    assert len(ran.stderr.strip().splitlines()) == 1 and "real numbers" in ran.stderr


# -- leftovers, listings, logs ------------------------------------------------------------------


def test_stale_temporary_files_are_removed_on_resume(tiny_preset, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", tiny_preset, "--out", run, "--epochs", 1).exit_code == 0
    stale = [
        run / ".checkpoint.safetensors.aecli-1a2b3c4d.tmp",
        run / "grids" / ".epoch-0002.png.aecli-0badf00d.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = [run / ".notes.tmp.txt", run / ".user.notes.tmp", run / ".draft.deadbeef.tmp"]
    for path in keep:  # the user's, whatever they look like
        path.write_text("the user's")
    assert cli("train", "--resume", run, "--epochs", 2).exit_code == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_listings_go_to_stdout_unwrapped(tmp_path):
    ran = shell(f"{AECLI} presets | grep vae")
    assert ran.returncode == 0 and "fashion-vae" in ran.stdout and "dog-vae" in ran.stdout
    ran = shell(f"{AECLI} info cifar-cae | grep compression")
    assert ran.returncode == 0 and "15.36x" in ran.stdout
    deep = tmp_path / ("a-rather-long-folder-name-" * 6) / "missing-weights.safetensors"
    ran = shell(f'{AECLI} info "{deep}"')
    assert ran.returncode == 2 and ran.stderr.strip() == f"error: {deep}: file not found"


def test_train_names_every_unreadable_file_and_link_loops(tmp_path, cli):
    data = tmp_path / "photos"
    for i in range(6):
        write_image(data / f"good-{i}.png", seed=i)
        (data / f"bad-{i}.png").write_text("not an image")
    os.symlink("loop", data / "loop")
    result = cli("train", "--data", data, "--out", tmp_path / "run", "--epochs", 1)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == 7
    assert any("loop: symbolic link loop" in line for line in skipped)


def test_help_texts_cite_nothing_users_do_not_have(cli):
    for command in ("train", "reconstruct", "encode", "decode", "sample", "interpolate", "diff"):
        assert "DESIGN" not in cli(command, "--help").stdout


def test_overwrite_writes_into_devices_and_fifos_never_replacing_them(
    tiny_weights, picture, tmp_path, cli
):
    """`-o` naming a character device or a FIFO writes into it, as a shell's `>` does; the node
    stays what it was (before, --overwrite renamed a regular file over it)."""
    import stat as st
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = cli("encode", tiny_weights, picture, "-o", fifo, "--overwrite")
    reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert st.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received and safetensors_header(received[0]) is not None  # the latent file, whole
    null = tmp_path / "mynull"
    try:
        os.mknod(null, st.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    for command in (
        ["encode", tiny_weights, picture, "-o", null, "--overwrite"],
        ["encode", tiny_weights, picture, "-o", null],  # into it: no --overwrite needed
        ["sample", tiny_weights, "-n", 2, "--latents-out", null],
    ):
        assert cli(*command).exit_code == 0
        assert st.S_ISCHR(os.lstat(null).st_mode) and os.stat(null).st_rdev == os.makedev(1, 3)


def test_a_live_run_folder_is_locked_against_a_second_train(tiny_preset, tmp_path, cli):
    """Two `aecli train` on one --out: the second (and --resume of the live run) is refused in
    one line naming the live process; once that process is gone, the folder is free."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "aecli", "train", str(tiny_preset), "--out", str(run),
         "--epochs", "200", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        lock = run / ".aecli-run.lock"
        for _ in range(600):
            if lock.exists() and lock.read_text() == str(first.pid):
                break
            time.sleep(0.05)
        for args in (["train", tiny_preset, "--out", run], ["train", "--resume", run]):
            result = cli(*args)
            assert result.exit_code == 2
            option = "--out" if "--out" in args else "--resume"
            expected = f"{option} {run}: another aecli train is running in this folder"
            assert f"{expected} (process {first.pid})" in one_line(result)
    finally:
        first.kill()
        first.wait()
    result = cli("train", tiny_preset, "--out", run, "--epochs", 1)
    assert "another aecli train" not in result.output


def test_markup_and_control_characters_in_names_are_shown_as_they_are(
    tiny_weights, tiny_preset, picture, tmp_path, cli
):
    """Rich markup in a path is printed, not interpreted (nor an error after the outputs were
    written); a control character in a failing file's name cannot forge a second line."""
    out = tmp_path / "q2" / "[/b]"
    result = cli("reconstruct", tiny_weights, picture, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"-> {out}" in result.stderr and (out / "a.png").exists()
    run = tmp_path / "out [v2] [red]"
    result = cli("train", tiny_preset, "--out", run, "--epochs", 1)
    assert result.exit_code == 0 and f"-> {run}" in result.stderr
    forged = tmp_path / "in" / "fake\nerror: forged\x1b[2J.png"
    forged.write_bytes(b"not an image")
    result = cli("reconstruct", tiny_weights, tmp_path / "in", "-o", tmp_path / "r")
    assert result.exit_code == 1
    failed = [line for line in result.stderr.splitlines() if "fake" in line]
    assert len(failed) == 1 and failed[0].startswith("failed:")
    assert "fake\\nerror: forged\\x1b[2J.png" in failed[0] and "\x1b" not in result.stderr
    assert not any(line.startswith("error: forged") for line in result.stderr.splitlines())


def rewrite_header(source: Path, target: Path, change) -> Path:
    """A copy of a safetensors file whose JSON header `change(header)` edited (data kept)."""
    data = source.read_bytes()
    header, length = safetensors_header(data)
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    return target


def test_doctored_headers_are_one_line_not_internal_errors(tiny_weights, tmp_path, cli):
    """Deep nesting, strings where numbers go, metrics that are not numbers, other dtypes, a
    symbolic-link loop: each is the one-line refusal with exit 2."""
    first = next(k for k in safetensors_header(tiny_weights.read_bytes())[0] if k[0] != "_")

    def offsets(header):
        header[first]["data_offsets"] = ["0", "8"]

    def dtype(kind):
        def change(header):
            header[first]["dtype"] = kind

        return change

    cases = {
        "nested config": (doctor(tiny_weights, tmp_path / "n.safetensors",
                                 metadata={"config": "[" * 100_000 + "]" * 100_000}),
                          "damaged aecli metadata"),
        "string metric": (doctor(tiny_weights, tmp_path / "m.safetensors",
                                 metadata={"metrics": json.dumps({"val_loss": "low"})}),
                          "metrics are not named numbers"),
        "string offsets": (rewrite_header(tiny_weights, tmp_path / "o.safetensors", offsets),
                           f"damaged safetensors header entry for {first}"),
        "F8": (rewrite_header(tiny_weights, tmp_path / "f8.safetensors", dtype("F8_E4M3")),
               f"tensor {first} is F8_E4M3; aecli reads weights stored as"),
        "metadata list": (rewrite_header(tiny_weights, tmp_path / "l.safetensors",
                                         lambda h: h.update(__metadata__=[1])),
                          "its metadata is not text"),
    }  # fmt: skip
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases["symlink loop"] = (loop, "a symbolic link that leads nowhere")
    for name, (path, expected) in cases.items():
        for command in (["info", path], ["reconstruct", path, tmp_path, "-o", tmp_path / "r"]):
            result = cli(*command)
            assert result.exit_code == 2, (name, result.output)
            assert expected in one_line(result), name


@pytest.mark.parametrize(
    "args, expected",
    [
        ("reconstruct W in --tile -1 -o x", "Invalid value for '--tile'"),
        ("encode W in -o z --tile 8 --tile-overlap -5", "Invalid value for '--tile-overlap'"),
        ("reconstruct", "Missing argument 'WEIGHTS'"),
        ("bogus", "No such command 'bogus'"),
    ],
)
def test_click_usage_errors_are_one_line(args, expected, tiny_weights, tmp_path):
    """What Click refuses before aecli runs is one line too, not a boxed usage message."""
    command = args.replace("W", str(tiny_weights)).replace(" in ", f" {tmp_path} ")
    ran = shell(f"{AECLI} {command}")
    assert ran.returncode == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert "--help" in lines[0] and "╭" not in ran.stderr


def test_a_read_only_file_system_is_named_as_such(tmp_path, monkeypatch):
    """The OS says "Read-only file system" for a folder on a read-only mount; so does aecli
    (not "permission denied"), as it does for folder outputs."""
    import aecli.io.outputs as outputs
    from aecli.errors import UsageError

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: ReadOnly())
    with pytest.raises(UsageError, match="cannot write in this folder: read-only file system"):
        outputs.make_folder(tmp_path, "-o")
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: type("RW", (), {"f_flag": 0})())
    with pytest.raises(UsageError, match="cannot write in this folder: permission denied"):
        outputs.make_folder(tmp_path, "-o")


def test_an_unreadable_input_on_the_command_line_is_one_line(tiny_weights, tiny_preset, tmp_path):
    """A file without read permission given directly: one line with exit 2, for every command
    that takes one. As root (who reads anything), the permission check is restored by running
    without the capabilities that override it."""
    import shutil

    image = tmp_path / "locked.png"
    write_image(image)
    image.chmod(0)
    prefix = []
    if os.geteuid() == 0:
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        if shutil.which("setpriv") is None or subprocess.run([*drop, "true"]).returncode != 0:
            pytest.skip("as root, needs setpriv to drop the capabilities that read anything")
        prefix = drop
    for command in (
        ["reconstruct", tiny_weights, image, "-o", tmp_path / "out/"],
        ["encode", tiny_weights, image, "-o", tmp_path / "z.safetensors"],
        ["info", image],
        ["train", tiny_preset, "--data", image, "--out", tmp_path / "run"],
    ):
        ran = subprocess.run(
            [*prefix, sys.executable, "-m", "aecli", *map(str, command)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = ran.stderr.strip().splitlines()
        assert ran.returncode == 2 and len(lines) == 1, ran.stderr
        assert "locked.png" in lines[0] and "internal error" not in lines[0]
        assert "readable" in lines[0] or "Permission denied" in lines[0]

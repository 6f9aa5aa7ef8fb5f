import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_ships_every_preset(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("aecli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "presets").glob("*.yaml"))
    assert len(presets) >= 7
    for preset in presets:
        assert f"aecli/presets/{preset}" in names
    assert "aecli/cli/train.py" in names
    assert any(name.endswith("entry_points.txt") for name in names)

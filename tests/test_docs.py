"""The documentation: generated references current, pictures made by the commands the pages
show, presets on the pages valid, links that resolve (issue 35)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_references_are_current():
    """docs/reference/*.md are what docs/generate.py makes from the code now: a new option,
    preset key or preset without `python docs/generate.py` fails here."""
    assert load("generate").stale_pages() == []


def test_every_preset_key_is_described():
    from pydantic import BaseModel

    from aecli import config

    models = [
        v
        for v in vars(config).values()
        if isinstance(v, type) and issubclass(v, BaseModel) and v is not config.Strict
    ]
    missing = [
        f"{model.__name__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if name != "type" and not field.description
    ]
    assert missing == []


def test_the_presets_on_the_pages_are_valid():
    """Every YAML block in the documentation is a preset aecli accepts."""
    from aecli.config import config_from_dict

    blocks = [
        (page.name, text)
        for page in sorted(DOCS.rglob("*.md"))
        for text in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)
    ]
    assert blocks
    for page, text in blocks:
        config_from_dict(yaml.safe_load(text), page)


def test_links_in_the_readme_and_pages_resolve():
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    for page in pages:
        text = page.read_text()
        targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
        for target in targets:
            if target.startswith(("http://", "https://", "#")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}"


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)[1].splitlines()
    assert first_block[0].startswith("pip install . && aecli train")
    assert first_block[1].startswith('pip install ".[test]" && pytest')
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "the README carries no dates"


@pytest.mark.slow
def test_getting_started_runs_and_makes_every_picture_it_shows(tmp_path):
    """The commands of Getting started (the README's first command among them) and the
    built-in-data walk-through, run as written on a fresh folder: each picture the pages show is
    a file those commands made, and the demo model reconstructs the shapes (PSNR > 22 dB)."""
    pictures = load("pictures")
    found = pictures.run_pages(tmp_path)
    shown = [name for page in pictures.PAGES for name in pictures.pictures(page)]
    assert shown and sorted(found) == sorted(set(shown))
    for name, path in found.items():
        assert path.stat().st_size > 0 and (DOCS / "images" / name).is_file()
    # the first command trained recognisable reconstructions of the shapes
    from conftest import epochs_of

    records = epochs_of(tmp_path / "runs" / "demo")
    assert records[-1]["val_loss"] < records[0]["val_loss"] / 4
    assert records[-1]["val_psnr"] > 22


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="needs the docs extra (mkdocs, mkdocs-material) in this Python",
)
def test_the_site_builds_strictly(tmp_path):
    ran = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (tmp_path / "reference" / "cli" / "index.html").is_file()


def readme_tour() -> str:
    """The README's short tour: the shell block under its heading, as one script."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"## A short tour\n+```bash\n(.*?)```", text, re.S)[1]


@pytest.mark.slow
def test_the_readme_tour_runs_top_to_bottom_as_written(tmp_path):
    """Every line of the tour, in order, in one shell, in a folder that holds what the tour
    takes as given: photos in class folders, a.png and b.png, runs/demo from the first command
    (made here from a tiny preset, to keep seconds), and a diffusers SD-style VAE folder. A line
    refused by one before it (two commands writing one -o folder) fails here."""
    import diffusers
    from conftest import TINY
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    for name, photo in zip(["china", "flower"], load_sample_images().images, strict=True):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i in range(4):
            y, x = rng.integers(0, 300, 2)
            Image.fromarray(photo[y : y + 48, x : x + 48]).save(folder / f"{i}.png")
    for name, source in [("a.png", "china/0.png"), ("b.png", "flower/0.png")]:
        Image.open(tmp_path / "photos" / source).save(tmp_path / name)
    (tmp_path / "tiny.yaml").write_text(TINY)
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(tmp_path / "sd-vae-ft-mse")  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)  # fmt: skip

    assert run("aecli train tiny.yaml --out runs/demo").returncode == 0
    tour = run(readme_tour())
    assert tour.returncode == 0, tour.stderr[-3000:]
    assert len(list((tmp_path / "recon").rglob("*.png"))) == 8
    assert len(list((tmp_path / "sd-recon").rglob("*.png"))) == 8
    assert (tmp_path / "latents" / "index.json").is_file()
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "path.png").is_file()

"""`aecli eval`: PSNR, SSIM, LPIPS and rFID equal to the reference implementations
(torchmetrics, torch-fidelity's Inception, the lpips package) on the same images and weights;
weights only ever read from local files, safely; the command end to end on a diffusers VAE."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import one_line, photos
from PIL import Image
from typer.testing import CliRunner

from aecli.cli.app import guarded
from aecli.cli.evaluate import EXAMPLES, HELP, evaluate
from aecli.errors import UsageError
from aecli.inference import InputFile
from aecli.inference.evaluate import (
    EvalSettings,
    Scores,
    evaluate_reconstructions,
    load_scores,
    match_reconstructions,
)

torchmetrics = pytest.importorskip("torchmetrics")
pytest.importorskip("torch_fidelity")
torchvision = pytest.importorskip("torchvision")

INCEPTION = "weights-inception-2015-12-05-6726825d.pth"
ALEXNET = "alexnet-owt-7be5be79.pth"


@pytest.fixture
def run_eval():
    """The command on a Typer app of its own, as aecli.cli registers it."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A group, so that the command keeps its name."""

    app.command(name="eval", epilog=EXAMPLES, help=HELP)(guarded(evaluate))
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, ["eval", *map(str, args)], catch_exceptions=False)

    return invoke


@pytest.fixture(autouse=True)
def empty_hub(tmp_path, monkeypatch) -> Path:
    """torch's hub cache in an empty folder: nothing found unless a test puts it there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """A random Inception in torch-fidelity's layout (torchvision's Inception3 keys, 1008
    classes, no auxiliary head), He-scaled convolutions so that features follow the image."""
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def alexnet_file(tmp_path_factory) -> Path:
    """A random AlexNet saved as torchvision saves its ImageNet weights."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("alexnet") / ALEXNET
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def image_pairs(count: int = 12, size: int = 64, seed: int = 0):
    """uint8 (N, 3, size, size) crops of real photos, and distorted copies (blur, noise, a
    colour shift growing with the index): reconstructions of varying quality."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    sources = load_sample_images().images
    originals, copies = [], []
    for i in range(count):
        source = sources[i % len(sources)]
        top, left = rng.integers(0, source.shape[0] - size), rng.integers(0, source.shape[1] - size)
        crop = source[top : top + size, left : left + size].astype(np.float64)
        blurred = (crop + np.roll(crop, 1, 0) + np.roll(crop, 1, 1)) / 3
        noisy = blurred + rng.normal(0, 4 + i, crop.shape) + i
        originals.append(crop.astype(np.uint8))
        copies.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    as_tensor = lambda images: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # noqa: E731
    return as_tensor(originals), as_tensor(copies)


def write_pairs(folder: Path, originals: torch.Tensor, copies: torch.Tensor):
    """The pairs as PNG files: folder/images/img{i}.png and folder/recon/img{i}.png."""
    for name, images in (("images", originals), ("recon", copies)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name / f"img{i:02}.png")
    files = sorted((folder / "images").iterdir())
    return [InputFile(p, p.name) for p in files], folder / "recon"


def read_images(folder: Path, names: list[str]) -> torch.Tensor:
    """Image files as float (N, C, H, W) of 8-bit values."""
    arrays = [np.array(Image.open(folder / name)) for name in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


def test_psnr_and_ssim_equal_torchmetrics():
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    originals, copies = image_pairs()
    scores = Scores().update(originals, copies)
    psnr = [
        peak_signal_noise_ratio(c[None].float(), o[None].float(), data_range=255.0).item()
        for o, c in zip(originals, copies, strict=True)
    ]
    # torchmetrics in float64; in float32 its own moments lose up to about 1e-5 of SSIM
    ssim = structural_similarity_index_measure(
        copies.double(), originals.double(), data_range=255.0, gaussian_kernel=True, sigma=1.5,
        kernel_size=11, reduction="none",
    )  # fmt: skip
    assert np.abs(np.array(scores["psnr"]) - psnr).max() < 1e-4
    assert np.abs(np.array(scores["ssim"]) - ssim.numpy()).max() < 1e-10
    assert np.mean(scores["psnr"]) == pytest.approx(np.mean(psnr), abs=1e-4)
    assert len(set(np.round(scores["psnr"], 3))) == len(psnr)  # the images differ


def test_fid_equals_torchmetrics_on_the_same_weights(tmp_path, inception_file):
    from torchmetrics.image.fid import FrechetInceptionDistance

    originals, copies = image_pairs(8)
    files, recon = write_pairs(tmp_path, originals, copies)
    settings = EvalSettings(fid=True, fid_weights=inception_file)
    scores, declared = load_scores(settings, torch.device("cpu"))
    result = evaluate_reconstructions(
        files, match_reconstructions(files, recon), settings, scores, torch.device("cpu"),
        batch_size=3, workers=0,
    )  # fmt: skip
    reference = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(inception_file)
    )
    reference.update(originals, real=True)
    reference.update(copies, real=False)
    expected = reference.compute().item()
    assert expected > 0.1  # the features follow the images: a real distance
    assert abs(result.metrics["rfid"] - expected) <= 1e-3 * expected
    assert declared["rfid"]["features"] == 2048
    assert declared["rfid"]["weights"] == str(inception_file)


def test_lpips_equals_the_lpips_package(empty_hub, alexnet_file):
    """aecli's LPIPS-alex from --lpips-weights against the lpips package's own, which
    torchvision builds from the same file found in the hub cache."""
    lpips = pytest.importorskip("lpips")
    import shutil
    import warnings

    shutil.copy(alexnet_file, empty_hub / ALEXNET)
    originals, copies = image_pairs(6)
    settings = EvalSettings(lpips="alex", lpips_weights=alexnet_file)
    scores, declared = load_scores(settings, torch.device("cpu"))
    ours = np.array(scores.update(originals, copies)["lpips"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False)
    with torch.no_grad():
        expected = reference(copies.float() / 127.5 - 1, originals.float() / 127.5 - 1)
    assert np.abs(ours - expected.flatten().numpy()).max() < 1e-5
    assert ours.std() > 0 and declared["lpips"]["net"] == "alex"
    # found in the hub cache alike
    cached, _ = load_scores(EvalSettings(lpips="alex"), torch.device("cpu"))
    assert np.allclose(cached.update(originals, copies)["lpips"], ours, atol=1e-6)


def test_lpips_vgg_reads_torchvisions_vgg16_layout(tmp_path):
    lpips = pytest.importorskip("lpips")
    import warnings

    torch.manual_seed(2)
    features = torchvision.models.vgg16().features
    path = tmp_path / "vgg16.safetensors"  # the trunk alone, as safetensors
    from safetensors.torch import save_file

    save_file({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    originals, copies = image_pairs(4, size=32)
    scores, _ = load_scores(EvalSettings(lpips="vgg", lpips_weights=path), torch.device("cpu"))
    ours = np.array(scores.update(originals, copies)["lpips"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    for part in reference.net.children():  # lpips' slices hold torchvision's layers by index
        for index, layer in part.named_children():
            layer.load_state_dict(features[int(index)].state_dict())
    with torch.no_grad():
        expected = reference(copies.float() / 127.5 - 1, originals.float() / 127.5 - 1)
    assert np.abs(ours - expected.flatten().numpy()).max() < 1e-5


@pytest.mark.parametrize("metric", ["--fid", "--lpips=vgg"])
def test_missing_weights_is_one_line_naming_where_and_how(tmp_path, run_eval, empty_hub, metric):
    photos(tmp_path / "photos")
    result = run_eval(tmp_path / "photos", tmp_path / "photos", metric)
    assert result.exit_code == 2
    line = one_line(result)
    assert str(empty_hub) in line and "never downloads" in line
    assert ("--fid-weights" if metric == "--fid" else "--lpips-weights") in line
    assert ("6726825d" if metric == "--fid" else "vgg16-397923af.pth") in line


def test_hostile_weights_file_is_refused_without_running_it(tmp_path, run_eval):
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    hostile = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Hostile()}, hostile)
    photos(tmp_path / "photos")
    result = run_eval(tmp_path / "photos", tmp_path / "photos", "--fid-weights", hostile)
    assert result.exit_code == 2
    line = one_line(result)
    assert "refused" in line and str(hostile) in line
    assert not marker.exists()


def test_foreign_tensors_are_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UsageError, match="not torch-fidelity's InceptionV3 weights .*Missing"):
        load_scores(EvalSettings(fid=True, fid_weights=path), torch.device("cpu"))


def test_reconstructions_matched_by_name(tmp_path, run_eval):
    originals, copies = image_pairs(3)
    files, recon = write_pairs(tmp_path, originals, copies)
    (recon / "img01.png").rename(recon / "img01.webp.png")  # not img01's
    result = run_eval(tmp_path / "w", tmp_path / "images", "--reconstructions", recon)
    assert result.exit_code == 2  # WEIGHTS not found comes first
    (tmp_path / "w").write_bytes(b"")
    result = run_eval(tmp_path / "w", tmp_path / "images", "--reconstructions", recon)
    assert result.exit_code == 2
    line = one_line(result)
    assert "no reconstruction of img01.png" in line
    (recon / "img01.webp.png").rename(recon / "img01.jpg")  # another suffix: matched
    (recon / "extra.png").write_bytes(b"")
    result = run_eval(tmp_path / "w", tmp_path / "images", "--reconstructions", recon)
    assert result.exit_code == 2 and "extra.png match no input" in one_line(result)
    (recon / "extra.png").unlink()
    Image.fromarray(copies[1].permute(1, 2, 0).numpy()).save(recon / "img01.jpg", quality=100)
    result = run_eval(tmp_path / "w", tmp_path / "images", "--reconstructions", recon, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 3 and report["settings"]["posterior"] is None


def test_end_to_end_on_a_diffusers_vae(tmp_path, run_eval, cli, inception_file, alexnet_file):
    """`aecli eval VAE photos/ --size 32 --fid-weights W --lpips alex --json` on a random
    diffusers AutoencoderKL and real photos: every setting named; the same figures from the
    files `reconstruct` writes; PSNR and SSIM as torchmetrics computes them on those files."""
    pytest.importorskip("lpips")
    from test_vae_files import make_vae
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    make_vae().save_pretrained(tmp_path / "vae")
    folder = tmp_path / "photos"
    photos(folder, size=(40, 48))
    from skimage import data

    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()[60:100, 150:198]).save(folder / f"{name}.png")
    common = ["--size", "32", "--fid-weights", inception_file, "--lpips", "alex",
              "--lpips-weights", alexnet_file, "--device", "cpu", "--json"]  # fmt: skip
    result = run_eval(tmp_path / "vae", folder, *common)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    settings = report["settings"]
    assert report["images"] == 4 and report["image_size"] == "32x32"
    assert set(report["metrics"]) == {"psnr", "ssim", "lpips", "rfid"}
    assert settings["posterior"] == "mean" and settings["seed"] is None
    assert "centre-cropped to 32x32" in settings["resize"]
    assert settings["precision"].startswith("fp32")
    assert settings["lpips"]["net"] == "alex" and len(settings["lpips"]["trunk_sha256"]) == 64
    assert settings["rfid"]["features"] == 2048 and settings["rfid"]["weights"]
    assert "255^2" in settings["psnr"] and "sigma 1.5" in settings["ssim"]
    assert report["peak_memory_bytes"] > 0 and report["images_per_second"] > 0
    assert "rFID" in report["line"] and "4 images, 32x32" in report["line"]
    assert "rFID over 4 images" in report["note"]
    assert len(report["rows"]) == 4 and {"file", "psnr", "ssim", "lpips"} == set(report["rows"][0])

    # the same images, cropped as eval crops them, through `reconstruct`, then measured as files
    cropped = tmp_path / "cropped"
    cropped.mkdir()
    for path in sorted(folder.iterdir()):
        from aecli.data.images import fit_image, read_image

        Image.fromarray(fit_image(read_image(path), (32, 32), "crop")).save(cropped / path.name)
    made = cli("reconstruct", tmp_path / "vae", cropped, "-o", tmp_path / "rec", "--device", "cpu")
    assert made.exit_code == 0, made.output
    no_fid = [a for a in common if a not in ("--fid-weights", inception_file)]
    given = run_eval(tmp_path / "vae", cropped, "--reconstructions", tmp_path / "rec", *no_fid)
    assert given.exit_code == 0, given.output
    again = json.loads(given.stdout)
    assert set(again["metrics"]) == {"psnr", "ssim", "lpips"}  # rFID from files: tested above
    for name, value in again["metrics"].items():
        assert report["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    names = sorted(p.name for p in cropped.iterdir())
    a, b = (read_images(d, names) for d in (cropped, tmp_path / "rec"))
    pairs = zip(a, b, strict=True)
    psnr = np.mean([peak_signal_noise_ratio(y[None], x[None], data_range=255.0) for x, y in pairs])
    ssim = structural_similarity_index_measure(b, a, data_range=255.0).item()
    assert report["metrics"]["psnr"] == pytest.approx(psnr, abs=1e-4)
    assert report["metrics"]["ssim"] == pytest.approx(ssim, abs=1e-5)

    sampled = run_eval(tmp_path / "vae", folder, "--sample", "--seed", "3", "--size", "32",
                       "--device", "cpu", "--json")  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    drawn = json.loads(sampled.stdout)
    assert drawn["settings"]["posterior"] == "sample" and drawn["settings"]["seed"] == 3
    assert drawn["settings"]["lpips"] is None and drawn["settings"]["rfid"] is None
    assert drawn["metrics"]["psnr"] != pytest.approx(report["metrics"]["psnr"])


def test_help_names_the_examples(run_eval):
    result = run_eval("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # however Click wraps the epilog
    assert "aecli eval sd-vae-ft-mse/ coco-val2017/ --size 256 --fid --lpips vgg" in text
    assert "--lpips-weights" in result.output and "--fid-weights" in result.output

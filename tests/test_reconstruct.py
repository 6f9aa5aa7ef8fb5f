"""`aecli reconstruct` and `aecli diff` on real files, through the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import pixels, snapshot, write_image, write_image_zoo

from aecli.inference import Predictor, image_metrics
from aecli.io.weights import read_weights_info


@pytest.fixture
def photos(tmp_path) -> Path:
    """Six 16x16 images, two of them in nested folders."""
    root = tmp_path / "photos"
    for i, name in enumerate(["a.png", "b.png", "c.jpg", "d.png", "x/e.png", "x/y/f.png"]):
        write_image(root / name, seed=i)
    return root


def test_bad_inputs_are_named_the_rest_processed_and_inputs_unchanged(tmp_path, tiny_weights, cli):
    root = tmp_path / "zoo"
    expected = write_image_zoo(root)
    before = snapshot(root)
    out = tmp_path / "out"
    result = cli(
        "reconstruct", tiny_weights, root, "-o", out, "--workers", "2", "--batch-size", "4"
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    for name, reason in expected.items():
        if reason is None:
            assert (out / name).with_suffix(".png").is_file(), name
        else:
            line = next((f for f in failed if f.startswith(f"failed: {root / name}:")), None)
            assert line is not None and reason in line, (name, failed)
    assert len(failed) == sum(r is not None for r in expected.values())
    assert snapshot(root) == before


def test_recursive_relative_paths_grid_and_metrics_json(photos, tmp_path, tiny_weights, cli):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    result = cli(
        "reconstruct", tiny_weights, photos, "-o", out, "--grid", grid, "--metrics", "--json"
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a.png", "b.png", "c.png", "d.png", "x/e.png", "x/y/f.png"]

    summary = json.loads(result.stdout)
    assert summary["images"] == 6 and summary["failed"] == []
    rows = {Path(r["file"]).relative_to(photos).as_posix(): r for r in summary["rows"]}
    for name in ("a.png", "x/y/f.png"):  # 16x16 inputs: the model sees them unchanged
        original, recon = pixels(photos / name), pixels(out / name)
        assert recon.shape == (16, 16, 3)
        mse = ((original / 255.0 - recon / 255.0) ** 2).mean()
        assert rows[name]["mse"] == pytest.approx(mse, rel=1e-5)
        assert rows[name]["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
        assert -1 <= rows[name]["ssim"] <= 1
    means = {k: np.mean([r[k] for r in summary["rows"]]) for k in ("mse", "psnr", "ssim")}
    assert summary["overall"] == pytest.approx(means)
    assert "Reconstruction quality" in result.stderr and "mean" in result.stderr

    sheet = pixels(grid)  # 6 originals (16 px tiles enlarged 4x) over their reconstructions
    assert sheet.shape == (2 + 2 * 66, 2 + 6 * 66, 3)

    def enlarged(path):
        return np.repeat(np.repeat(pixels(path), 4, 0), 4, 1)

    assert np.array_equal(sheet[2:66, 2:66], enlarged(photos / "a.png"))
    assert np.array_equal(sheet[68:132, 2:66], enlarged(out / "a.png"))


def test_other_sizes_are_resized_for_vector_models_unless_keep_size(tmp_path, tiny_weights, cli):
    write_image(tmp_path / "in" / "wide.png", size=(20, 44))
    result = cli("reconstruct", tiny_weights, tmp_path / "in", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert pixels(tmp_path / "a" / "wide.png").shape == (16, 16, 3)
    result = cli("reconstruct", tiny_weights, tmp_path / "in", "-o", tmp_path / "b", "--keep-size")
    assert result.exit_code == 0, result.output
    assert pixels(tmp_path / "b" / "wide.png").shape == (20, 44, 3)


def test_fully_convolutional_models_work_at_native_size(tmp_path, conv_weights, cli):
    sizes = {"odd.png": (21, 13), "big.png": (40, 64), "gray.png": (16, 16)}
    for i, (name, size) in enumerate(sizes.items()):
        mode = "L" if "gray" in name else "RGB"
        write_image(tmp_path / "in" / name, size=size, seed=i, mode=mode)
    result = cli("reconstruct", conv_weights, tmp_path / "in", "-o", tmp_path / "out", "--metrics")
    assert result.exit_code == 0, result.output
    for name, size in sizes.items():
        assert pixels(tmp_path / "out" / name).shape == (*size, 3)


def test_outputs_never_overwrite_inputs_or_existing_files(photos, tmp_path, tiny_weights, cli):
    before = snapshot(photos)
    for target in (photos, photos / "x", photos / "new"):
        result = cli("reconstruct", tiny_weights, photos, "-o", target)
        assert result.exit_code == 2
        assert "inside the input folder" in result.stderr and "Traceback" not in result.output
    # a single file whose output would land on itself
    result = cli("reconstruct", tiny_weights, photos / "a.png", "-o", photos)
    assert result.exit_code == 2 and "is one of this command's inputs" in result.stderr
    assert snapshot(photos) == before

    out = tmp_path / "out"
    assert cli("reconstruct", tiny_weights, photos, "-o", out).exit_code == 0
    stamp = (out / "a.png").stat().st_mtime_ns
    result = cli("reconstruct", tiny_weights, photos, "-o", out)
    assert result.exit_code == 2 and "already exist; pass --overwrite" in result.stderr
    assert (out / "a.png").stat().st_mtime_ns == stamp
    assert cli("reconstruct", tiny_weights, photos, "-o", out, "--overwrite").exit_code == 0


def test_same_stem_keeps_suffix_and_usage_errors(tmp_path, tiny_weights, cli):
    write_image(tmp_path / "in" / "p.jpg")
    write_image(tmp_path / "in" / "p.png", seed=1)
    result = cli("reconstruct", tiny_weights, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.jpg.png", "p.png.png"]

    result = cli("reconstruct", tiny_weights, tmp_path / "nope", "-o", tmp_path / "o2")
    assert result.exit_code == 2 and "input does not exist" in result.stderr
    result = cli("reconstruct", tiny_weights, tmp_path / "in")
    assert result.exit_code == 2 and "nothing to do" in result.stderr
    result = cli("reconstruct", tmp_path / "in" / "p.png", tmp_path / "in", "--metrics")
    assert result.exit_code == 2 and "not a safetensors file" in result.stderr


def test_diff_orders_worst_first_and_draws_the_top_k(photos, tmp_path, tiny_weights, cli):
    sheet = tmp_path / "diff.png"
    result = cli("diff", tiny_weights, photos, "-o", sheet, "--top", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = summary["rows"]
    assert len(rows) == 6 and set(rows[0]) == {"file", "mse", "psnr", "ssim"}
    assert [r["mse"] for r in rows] == sorted((r["mse"] for r in rows), reverse=True)

    title = f"Worst 3 of 6 images (by MSE of {tiny_weights})"
    assert title in [line.strip() for line in result.stderr.splitlines()]  # whole: not wrapped

    # 3 rows of original | reconstruction | signed error | |error|, tiles of 16 px x 8 = 128
    image = pixels(sheet)
    assert image.shape == (14 + 2 + 3 * (14 + 128 + 2), 2 + 4 * (128 + 2), 3)
    worst = Path(rows[0]["file"])
    tile = image[14 + 2 + 14 : 14 + 2 + 14 + 128, 2 : 2 + 128]
    assert np.array_equal(tile, np.repeat(np.repeat(pixels(worst), 8, 0), 8, 1))


def test_diff_vs_compares_two_models_per_image(photos, tiny_weights, other_weights, cli):
    result = cli("diff", tiny_weights, photos, "--vs", other_weights, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for row in summary["rows"]:
        assert {"vs_mse", "vs_psnr", "vs_ssim", "winner"} <= set(row)
        better = "weights" if row["mse"] < row["vs_mse"] else "vs"
        assert row["winner"] == better
    wins = summary["wins"]
    assert wins["weights"] + wins["vs"] + wins["tie"] == 6
    vs_mean = np.mean([r["vs_psnr"] for r in summary["rows"]])
    mean = np.mean([r["psnr"] for r in summary["rows"]])
    assert summary["mean_difference"]["psnr"] == pytest.approx(vs_mean - mean)
    assert "better on" in result.stderr

    same = json.loads(cli("diff", tiny_weights, photos, "--vs", tiny_weights, "--json").stdout)
    assert same["wins"]["tie"] == 6 and same["mean_difference"]["psnr"] == 0


def test_diff_vs_refuses_models_that_see_different_inputs(photos, tiny_weights, conv_weights, cli):
    result = cli("diff", tiny_weights, photos, "--vs", conv_weights)
    assert result.exit_code == 2 and "--vs" in result.stderr


def test_metrics_match_the_definitions():
    import torch

    a = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    b = a.clone()
    b[1] = 51  # 0.2 everywhere
    scores = image_metrics(a, b)
    assert scores["mse"].tolist() == pytest.approx([0.0, 0.04])
    assert scores["psnr"][1].item() == pytest.approx(10 * np.log10(1 / 0.04), rel=1e-5)
    assert scores["ssim"][0].item() == pytest.approx(1.0)


def test_predictor_knows_fully_convolutional_models(tiny_weights, conv_weights):
    vector, conv = Predictor(tiny_weights, "cpu"), Predictor(conv_weights, "cpu")
    assert not vector.fully_convolutional and vector.size == (16, 16)
    assert conv.fully_convolutional and conv.factor == 4 and conv.latent_shape == (2, 4, 4)
    assert vector.fingerprint == read_weights_info(tiny_weights).fingerprint


def test_batches_in_flight_give_what_one_batch_gives(photos, tmp_path, tiny_weights, cli):
    """Batches of 2 (each one's results fetched while the next runs) write the same PNGs, rows,
    metrics and grid as the six images in one batch; the default batch is 32 on the CPU."""
    summaries = {}
    for batch in (2, 6):
        out = tmp_path / f"out{batch}"
        ran = cli(
            "reconstruct", tiny_weights, photos, "-o", out, "--grid", tmp_path / f"g{batch}.png",
            "--metrics", "--json", "--batch-size", batch, "--workers", "0", "--device", "cpu",
        )  # fmt: skip
        assert ran.exit_code == 0, ran.output
        summaries[batch] = json.loads(ran.stdout)
    for key in ("mse", "psnr", "ssim"):
        one = [r[key] for r in summaries[6]["rows"]]
        assert [r[key] for r in summaries[2]["rows"]] == pytest.approx(one, rel=1e-6)
    names = sorted(p.relative_to(tmp_path / "out6") for p in (tmp_path / "out6").rglob("*.png"))
    assert len(names) == 6
    for name in names:
        assert np.array_equal(pixels(tmp_path / "out2" / name), pixels(tmp_path / "out6" / name))
    assert np.array_equal(pixels(tmp_path / "g2.png"), pixels(tmp_path / "g6.png"))
    predictor = Predictor(tiny_weights, "cpu")
    assert predictor.batch_size(None) == 32 and predictor.batch_size(5) == 5


def test_activation_estimate_sizes_cuda_batches_for_vector_and_convolutional_models(
    tiny_weights, conv_weights, monkeypatch
):
    """On CUDA a batch holds as many images as fit a quarter of the free memory, from an
    estimate of three float32 copies of the largest tensor between the model's blocks (what
    running the model shows). It crashed for vector latents, whose decoder was traced with a
    spatial latent; the CUDA branch runs here on the CPU with a stand-in for the free memory."""
    import torch

    import aecli.inference.predictor as predictor_module
    from aecli.inference.predictor import MAX_AUTO_BATCH

    for weights in (tiny_weights, conv_weights):
        predictor = Predictor(weights, "cpu")
        model, c = predictor.model, predictor.channels
        sizes = [predictor.size] + ([(40, 24)] if predictor.fully_convolutional else [])
        for h, w in sizes:
            largest = [c * h * w]
            hooks = [
                block.register_forward_hook(
                    lambda _m, _i, out, seen=largest: seen.append(out.numel())
                )
                for block in [*model.encoder, model.latent_head, *model.decoder]
            ]
            with torch.no_grad():
                model(torch.zeros(1, c, h, w), sample=False)
            for hook in hooks:
                hook.remove()
            assert predictor._activation_bytes("reconstruct", (c, h, w)) == 3 * 4 * max(largest)
        predictor.device = torch.device("cuda", 0)  # the CUDA branch, without a GPU
        monkeypatch.setattr(predictor_module, "available_memory", lambda _device: 8 * 2**30)
        expected = MAX_AUTO_BATCH if not predictor.fully_convolutional else 32
        assert predictor.batch_size(None) == expected and predictor.batch_size(7) == 7
        monkeypatch.setattr(predictor_module, "available_memory", lambda _device: 2**20)
        assert predictor.batch_size(None) == 32  # never fewer than the CPU's default

"""Held-out reconstruction quality of the reference presets and aecli's own counterparts.

Each pair trains on the same images for the same number of images seen, on the same device,
and is measured on images it never saw: PSNR, SSIM and MS-SSIM (as many scales as the size
allows) on 8-bit reconstructions in [0, 1]. Data, all without a download:

- digits28: scikit-learn's 1,797 handwritten digits upsampled to 28x28 (grey); a fixed fifth
  held out;
- photos32 / photos127 / photos256: crops of photos and textures that scikit-learn and
  scikit-image ship, in equal numbers from each training source. Two held-out sets:
  - **other sources** (the first column): crops of photos no training crop comes from, colour
    and grey, each with its own figure: VALIDATION_SOURCES;
  - **same photos**: crops of the right 30% of scikit-learn's two sample photos (40% for
    256x256, so that a crop fits), whose left part is in the training set.
  Training sources, TRAIN_SOURCES: scikit-learn's china and flower (left part only);
  scikit-image's coffee, hubble_deep_field, immunohistochemistry and retina (colour), camera,
  brick, grass, gravel, moon, clock, page and cell (grey, as three equal channels).
  Held out: scikit-image's astronaut, chelsea and rocket (colour), coins and text (grey).
  Sources smaller than a crop are left out at that size (text and page at 256x256);
- shapes32 / shapes28: aecli's built-in shapes, held-out images drawn with another seed.

`--folds K` (K >= 4) measures the photo pairs on K splits instead of one: all 19 photo sources
(TRAIN_SOURCES and VALIDATION_SOURCES together, whole images, no "same photos" column) are
dealt in turn to K groups, the 9 colour sources first and then the 10 grey ones, in the order
of those two lists (fold_groups), so that every group has colour and grey sources. Fold k
trains on the crops of every other group (as many crops as above, in equal numbers from each
source) and is measured on crops of group k's sources, which it never trained on. With 4 folds:
  0: china, immunohistochemistry, rocket, gravel, cell;
  1: flower, retina, camera, moon, coins;
  2: coffee, astronaut, brick, clock, text;
  3: hubble_deep_field, chelsea, grass, page.
It prints a row per fold (each preset's median over the seeds, with the spread, and the lead)
and the worst fold's lead; `--jobs N` trains N runs side by side, the threads shared out.

`--pairs kl` trains cat-kl-f8 (no counterpart: the issue asks for its figures with the full
objective) on 256x256 photo crops and adds held-out LPIPS (VGG) where torchvision's VGG16
weights are in the torch hub cache; without them it trains with loss.perceptual_weight=0 and
says so. It needs a GPU: about 2.7 TFLOP per training image. A budget under one epoch
(`--budget 0.01`: 200 images seen) trains one epoch over fewer crops; the held-out crops stay.

Runs are short on a CPU, so each is repeated with seeds 0, 1 and 2 (`--repeats`) and the
median reported, with the spread (largest minus smallest) of the first column (`--seeds 1,2`:
those seeds; runs of one seed each can go in parallel, the medians then taken by hand). Run:
python benchmarks/quality.py [--pairs mnist,cifar,dog,fashion,cifar1000,kl] [--device cpu]
[--budget 1.0] (a multiplier on every pair's images seen; state it when it is not 1)
[--per-source] [--data photos32,...] [--set KEY=VALUE ...] [--only-ours | --only-reference]
[--ours PRESET] (--set: overrides for aecli's counterpart; --ours: another counterpart, a YAML
path; both for tuning) [--folds 4 [--jobs 2]]. The default is mnist,cifar: minutes on a CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aecli.config import load_config
from aecli.data import ImageData, validation_count
from aecli.data.shapes import make_shapes
from aecli.inference import Predictor
from aecli.losses import ms_ssim, psnr, ssim
from aecli.run.training import train


@dataclass(frozen=True)
class Pair:
    reference: str
    ours: str | None
    data: list[str]
    images_seen: int  # per training run, asked for (the run rounds it to whole epochs)


PAIRS = {
    "mnist": Pair("mnist-cae", "mnist-res", ["digits28", "shapes28"], 40_000),
    "cifar": Pair("cifar-cae", "cifar-res", ["photos32", "shapes32"], 40_000),
    "dog": Pair("dog-vae", "dog-res", ["photos127"], 20_000),
    "kl": Pair("cat-kl-f8", None, ["photos256"], 20_000),
    # the other references, for their own figures (no counterpart of aecli's)
    "fashion": Pair("fashion-vae", None, ["digits28", "shapes28"], 40_000),
    "cifar1000": Pair("cifar-cae-1000", None, ["photos32", "shapes32"], 40_000),
}


def digits(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype("float32") / 16.0)[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    held = len(images) // 5
    return images[order[held:]], images[order[:held]]


# scikit-learn's sample photos and scikit-image's data; grey images become three equal channels
TRAIN_SOURCES = [
    *("china", "flower", "coffee", "hubble_deep_field", "immunohistochemistry", "retina"),
    *("camera", "brick", "grass", "gravel", "moon", "clock", "page", "cell"),
]
VALIDATION_SOURCES = ["astronaut", "chelsea", "rocket", "coins", "text"]
SAME_PHOTOS = ["china", "flower"]  # their left part trains, their right part is held out
assert not set(TRAIN_SOURCES) & set(VALIDATION_SOURCES)


# scikit-image's data files of the sources (read with PIL, so that scikit-image's own
# dependencies, scipy among them, need not be installed: a GPU machine without a registry)
SKIMAGE_FILES = {"coffee": "coffee.png", "hubble_deep_field": "hubble_deep_field.jpg",
                 "immunohistochemistry": "ihc.png", "retina": "retina.jpg",
                 "camera": "camera.png", "brick": "brick.png", "grass": "grass.png",
                 "gravel": "gravel.png", "moon": "moon.png", "clock": "clock_motion.png",
                 "page": "page.png", "cell": "cell.png", "astronaut": "astronaut.png",
                 "chelsea": "chelsea.png", "rocket": "rocket.jpg", "coins": "coins.png",
                 "text": "text.png"}  # fmt: skip


def source_image(name: str) -> np.ndarray:
    """One source as uint8 (H, W, 3), from scikit-learn or scikit-image (no download)."""
    if name in SAME_PHOTOS:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[SAME_PHOTOS.index(name)]
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit("the photo data sets need scikit-image (pip install scikit-image)")
    with Image.open(Path(spec.origin).parent / "data" / SKIMAGE_FILES[name]) as file:
        image = np.asarray(file.convert("RGB") if file.mode not in ("L", "RGB") else file)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


@dataclass
class PhotoSplit:
    train: torch.Tensor  # (N, 3, S, S) uint8
    other: torch.Tensor  # crops of VALIDATION_SOURCES
    other_sources: list[str]  # the source of each
    same: torch.Tensor  # crops of the right part of SAME_PHOTOS
    train_sources: list[str]  # the source of each training crop


def _crop(rng, image: np.ndarray, size: int, x0: int, x1: int) -> torch.Tensor:
    h = image.shape[0]
    y, x = rng.integers(0, h - size + 1), rng.integers(x0, x1 + 1)
    return torch.from_numpy(image[y : y + size, x : x + size].copy()).permute(2, 0, 1)


def photo_crops(size: int, train_count: int, test_count: int) -> PhotoSplit:
    """Training crops in equal numbers from every training source (SAME_PHOTOS from their
    left part only), held-out crops from every validation source and from SAME_PHOTOS'
    right part."""
    rng = np.random.default_rng(0)
    images = {n: source_image(n) for n in TRAIN_SOURCES + VALIDATION_SOURCES}
    fits = {n: im for n, im in images.items() if min(im.shape[:2]) >= size}

    def split(name: str) -> int:  # where SAME_PHOTOS' held-out part begins
        w = fits[name].shape[1]
        return min(int(w * 0.7), w - size)

    train_names = [n for n in TRAIN_SOURCES if n in fits]
    train, train_sources = [], []
    for i in range(train_count):
        name = train_names[i % len(train_names)]
        image = fits[name]
        x1 = split(name) - size if name in SAME_PHOTOS else image.shape[1] - size
        train.append(_crop(rng, image, size, 0, x1))
        train_sources.append(name)
    other_names = [n for n in VALIDATION_SOURCES if n in fits]
    other, other_sources = [], []
    for i in range(test_count):
        name = other_names[i % len(other_names)]
        other.append(_crop(rng, fits[name], size, 0, fits[name].shape[1] - size))
        other_sources.append(name)
    same = []
    for i in range(test_count):
        name = SAME_PHOTOS[i % 2]
        same.append(_crop(rng, fits[name], size, split(name), fits[name].shape[1] - size))
    return PhotoSplit(torch.stack(train), torch.stack(other), other_sources, torch.stack(same),
                      train_sources)  # fmt: skip


def shapes(size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = make_shapes(2048, (size, size), channels, seed=0)
    test, _ = make_shapes(256, (size, size), channels, seed=12345)
    return torch.from_numpy(train), torch.from_numpy(test)


@dataclass
class Data:
    train: torch.Tensor
    held: dict[str, torch.Tensor]  # column -> held-out images; the first is the headline
    sources: list[str] | None = None  # the first held-out set's source of each image


PHOTO_COUNTS = {32: (4000, 500), 127: (800, 100), 256: (400, 50)}  # size -> training, held out


def dataset(name: str) -> Data:
    if name == "digits28":
        return Data(*digits()[:1], {"held-out": digits()[1]})
    if name.startswith("photos"):
        size = int(name[6:])
        split = photo_crops(size, *PHOTO_COUNTS[size])
        held = {"other sources": split.other, "same photos": split.same}
        return Data(split.train, held, split.other_sources)
    train, test = shapes(28, 1) if name == "shapes28" else shapes(32, 3)
    return Data(train, {"held-out": test})


GREY_SOURCES = {"camera", "brick", "grass", "gravel", "moon", "clock", "page", "cell", "coins",
                "text"}  # fmt: skip


def fold_groups(folds: int) -> list[list[str]]:
    """Every photo source in `folds` groups: the colour sources, then the grey ones, in the
    order of TRAIN_SOURCES + VALIDATION_SOURCES, dealt to the groups in turn (so each group has
    colour and grey sources while `folds` <= 9)."""
    names = TRAIN_SOURCES + VALIDATION_SOURCES
    dealt = [n for n in names if n not in GREY_SOURCES] + [n for n in names if n in GREY_SOURCES]
    return [dealt[k::folds] for k in range(folds)]


def fold_crops(size: int, train_count: int, test_count: int, held: list[str]) -> Data:
    """Crops of whole sources: training crops in equal numbers from every source not in `held`,
    held-out crops in equal numbers from those in `held` (sources smaller than a crop left out)."""
    rng = np.random.default_rng(0)
    images = {n: source_image(n) for n in TRAIN_SOURCES + VALIDATION_SOURCES}
    fits = [n for n, im in images.items() if min(im.shape[:2]) >= size]

    def crops(names: list[str]) -> torch.Tensor:
        return torch.stack([_crop(rng, images[n], size, 0, images[n].shape[1] - size)
                            for n in names])  # fmt: skip

    train = [n for n in fits if n not in held]
    other = [n for n in fits if n in held]
    sources = [other[i % len(other)] for i in range(test_count)]
    trained = [train[i % len(train)] for i in range(train_count)]
    return Data(crops(trained), {"held-out sources": crops(sources)}, sources)


def lpips_available() -> bool:
    from aecli.errors import ConfigError
    from aecli.perceptual import check_available

    try:
        check_available()
    except ConfigError:
        return False
    return True


def evaluate(weights: Path, test: torch.Tensor, device: str, lpips: bool) -> dict:
    """Figures over `test`, and "per_image": each image's PSNR."""
    predictor = Predictor(weights, device)
    recon = torch.cat([predictor.reconstruct(batch).cpu() for batch in test.split(16)])
    a, b = recon.float() / 255.0, test.float() / 255.0
    per_image = psnr(a, b)
    figures = {
        "psnr": per_image.mean().item(),
        "ssim": ssim(a, b).item(),
        "ms_ssim": ms_ssim(a, b).item(),
        "per_image": per_image.tolist(),
    }
    if lpips:
        from aecli.perceptual import load_lpips

        net = load_lpips(predictor.device)
        with torch.no_grad():
            distances = [
                net(x.to(predictor.device) * 2 - 1, y.to(predictor.device) * 2 - 1).flatten().cpu()
                for x, y in zip(a.split(16), b.split(16), strict=True)
            ]
        figures["lpips"] = torch.cat(distances).mean().item()
    return figures


def run(preset: str, data: Data, images_seen: int, seed: int, device: str, work: Path,
        extra: list[str] = ()) -> dict[str, dict]:  # fmt: skip
    """One training run (with `extra` --set overrides); its figures on each held-out set, and
    its seconds and images seen."""
    fraction = load_config(preset, []).config.data.val_fraction  # what the run holds out
    train_images = fewer_images(data.train, images_seen, fraction)
    usable = len(train_images) - validation_count(len(train_images), fraction)
    epochs = max(1, round(images_seen / usable))
    overrides = [f"train.epochs={epochs}", f"train.seed={seed}", "train.early_stopping=null",
                 *extra]  # fmt: skip
    config = load_config(preset, overrides).config
    lpips = config.loss.perceptual_weight > 0 and lpips_available()
    if config.loss.perceptual_weight > 0 and not lpips:
        config = load_config(preset, [*overrides, "loss.perceptual_weight=0"]).config
    if train_images.shape[1] != config.data.channels or tuple(train_images.shape[2:]) != tuple(
        config.data.size
    ):
        raise SystemExit(f"{preset} takes {config.data.channels}x{config.data.size} images")
    start = time.perf_counter()
    result = train(config, ImageData(train_images, None, None, {"kind": "benchmark"}),
                   Path(tempfile.mkdtemp(prefix=f"{Path(preset).stem}-{seed}-", dir=work)),
                   preset=preset, device=device)  # fmt: skip
    seconds = time.perf_counter() - start
    found = {
        name: evaluate(result.weights, test, device, lpips) for name, test in data.held.items()
    }
    found["run"] = {"seconds": seconds, "images_seen": epochs * usable}
    return found


def fewer_images(train_images: torch.Tensor, images_seen: int, fraction: float) -> torch.Tensor:
    """The training images, cut to the fewest whose one epoch still sees `images_seen`.

    A budget under one epoch (cat-kl-f8 on a CPU) then trains one shorter epoch instead of
    rounding up to the whole set.
    """
    count = max(2, images_seen)  # a split needs two
    while count - validation_count(count, fraction) < images_seen:
        count += 1
    return train_images if count >= len(train_images) else train_images[:count]


def describe(sources: list[str]) -> str:
    """'a, b (colour); c (grey)'."""
    parts = []
    for kind, grey in (("colour", False), ("grey", True)):
        names = [n for n in sources if (n in GREY_SOURCES) == grey]
        if names:
            parts.append(f"{', '.join(names)} ({kind})")
    return "; ".join(parts)


def compare_folds(pair: Pair, data_name: str, args: argparse.Namespace, seeds: list[int],
                  work: Path) -> None:  # fmt: skip
    """Train the pair on every fold of a photo data set and print a row per fold: each preset's
    median PSNR on the fold's held-out sources, the lead, and the worst fold's lead."""
    size = int(data_name[6:])
    groups = fold_groups(args.folds)
    folds = [fold_crops(size, *PHOTO_COUNTS[size], held) for held in groups]
    seen = int(pair.images_seen * args.budget)
    presets = [pair.reference, pair.ours]
    jobs = [(k, preset, seed) for k in range(args.folds) for preset in presets for seed in seeds]
    threads = max(1, torch.get_num_threads() // args.jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.jobs, context, initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        futures = {job: pool.submit(run, job[1], folds[job[0]], seen, job[2], args.device, work,
                                    args.set if job[1] == pair.ours else [])
                   for job in jobs}  # fmt: skip
        found = {}
        for job, future in futures.items():
            found[job] = future.result()["held-out sources"] | future.result()["run"]
            print(
                f"{data_name} fold {job[0]} {job[1]} seed {job[2]}: "
                f"{found[job]['psnr']:.2f} dB, {found[job]['seconds']:.0f} s",
                flush=True,
            )

    def cell(k: int, preset: str) -> tuple[float, str]:
        values = [found[k, preset, seed]["psnr"] for seed in seeds]
        median = statistics.median(values)
        return median, f"{median:.2f} dB (spread {max(values) - min(values):.2f})"

    print(
        f"\n{data_name}, {args.folds} folds, held-out PSNR: median of seeds "
        f"{', '.join(map(str, seeds))} (spread: largest minus smallest); "
        f"{found[jobs[0]]['images_seen']:,} images seen\n"
    )
    print(
        f"| fold | held-out sources | {pair.reference} | {pair.ours} | lead | "
        f"train s ({pair.reference}, {pair.ours}) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    leads = []
    for k, held in enumerate(groups):
        (reference, reference_text), (ours, ours_text) = cell(k, pair.reference), cell(k, pair.ours)
        leads.append(ours - reference)
        seconds = [statistics.median(found[k, p, s]["seconds"] for s in seeds) for p in presets]
        print(
            f"| {k} | {describe(held)} | {reference_text} | {ours_text} | "
            f"{leads[-1]:+.2f} dB | {seconds[0]:.0f}, {seconds[1]:.0f} |"
        )
    worst = min(range(args.folds), key=leads.__getitem__)
    print(f"\nworst fold: {worst}, lead of {pair.ours} {leads[worst]:+.2f} dB")
    if args.per_source:
        print(f"\n| fold | held-out source | {pair.reference} | {pair.ours} | lead |")
        print("| --- | --- | --- | --- | --- |")
        for k in range(args.folds):
            sources = folds[k].sources
            for name in dict.fromkeys(sources):
                medians = [statistics.median(
                    np.mean([v for v, n in zip(found[k, p, s]["per_image"], sources, strict=True)
                             if n == name]) for s in seeds) for p in presets]  # fmt: skip
                print(
                    f"| {k} | {name} | {medians[0]:.2f} dB | {medians[1]:.2f} dB | "
                    f"{medians[1] - medians[0]:+.2f} dB |"
                )


def seed_list(text: str) -> list[int]:
    """--seeds: comma-separated non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="mnist,cifar")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--seeds", type=seed_list, help="these seeds (comma-separated) instead of 0..repeats-1"
    )
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--per-source", action="store_true", help="each held-out source's PSNR")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for aecli's counterpart (tuning); repeatable",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-ours", action="store_true", help="skip the reference presets")
    only.add_argument("--only-reference", action="store_true", help="skip aecli's counterparts")
    parser.add_argument(
        "--ours",
        metavar="PRESET",
        help="train this preset (a name or a YAML path) as aecli's "
        "counterpart instead of the bundled one (tuning)",
    )
    parser.add_argument("--data", help="only these data sets (comma-separated), e.g. photos32")
    parser.add_argument(
        "--folds",
        type=int,
        help="split all photo sources into this many folds (at least 4; see fold_groups) and "
        "train each pair once per fold and seed, holding that fold's sources out",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="with --folds: runs side by side, threads shared"
    )
    args = parser.parse_args()
    if args.folds is not None and args.folds < 4:
        parser.error("--folds takes at least 4")
    seeds = args.seeds or list(range(args.repeats))
    work = Path(tempfile.mkdtemp(prefix="aecli-quality-"))
    if "kl" in args.pairs.split(",") and not lpips_available():
        print("cat-kl-f8: no VGG16 weights in the torch hub cache: trained without LPIPS")
    if args.folds:
        for key in args.pairs.split(","):
            pair = PAIRS[key]
            if args.ours:
                pair = Pair(pair.reference, args.ours, pair.data, pair.images_seen)
            for data_name in pair.data:
                if data_name.startswith("photos") and pair.ours is not None:
                    compare_folds(pair, data_name, args, seeds, work)
        return
    print(f"held-out PSNR: median of seeds {', '.join(map(str, seeds))} (spread: largest minus "
          "smallest)\n")  # fmt: skip
    print("| data | preset | held-out PSNR (other sources for photos) | same photos | SSIM | "
          "MS-SSIM | LPIPS | train s | images seen |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    sources: list[str] = []
    for key in args.pairs.split(","):
        pair = PAIRS[key]
        if args.ours:
            pair = Pair(pair.reference, args.ours, pair.data, pair.images_seen)
        for data_name in pair.data:
            if args.data and data_name not in args.data.split(","):
                continue
            data = dataset(data_name)
            seen = int(pair.images_seen * args.budget)
            headline = next(iter(data.held))
            medians = {}
            presets = (pair.ours,) if args.only_ours else (pair.reference, pair.ours)
            presets = (pair.reference,) if args.only_reference else presets
            for preset in filter(None, presets):
                extra = args.set if preset == pair.ours else []
                runs = [run(preset, data, seen, seed, args.device, work, extra)
                        for seed in seeds]  # fmt: skip
                first = [r[headline]["psnr"] for r in runs]
                medians[preset] = statistics.median(first)

                def med(part: str, figure: str, runs=runs) -> float:
                    return statistics.median(r[part][figure] for r in runs)

                same = (f"{med('same photos', 'psnr'):.2f} dB"
                        if "same photos" in data.held else "-")  # fmt: skip
                lpips_text = (
                    f"{med(headline, 'lpips'):.4f}" if "lpips" in runs[0][headline] else "-"
                )
                print(
                    f"| {data_name} | {preset} | {medians[preset]:.2f} dB "
                    f"(spread {max(first) - min(first):.2f}) | {same} | "
                    f"{med(headline, 'ssim'):.4f} | {med(headline, 'ms_ssim'):.4f} | "
                    f"{lpips_text} | {med('run', 'seconds'):.0f} | "
                    f"{med('run', 'images_seen'):,.0f} |",
                    flush=True,
                )
                if data.sources is not None:
                    for name in dict.fromkeys(data.sources):
                        values = [
                            np.mean([p for p, s in zip(r[headline]["per_image"], data.sources,
                                                       strict=True) if s == name])
                            for r in runs
                        ]  # fmt: skip
                        sources.append(f"| {data_name} | {preset} | {name} | "
                                       f"{statistics.median(values):.2f} dB |")  # fmt: skip
            if pair.ours in medians and pair.reference in medians:
                lead = medians[pair.ours] - medians[pair.reference]
                print(f"| {data_name} | lead of {pair.ours} | {lead:+.2f} dB | | | | | | |",
                      flush=True)  # fmt: skip
    if args.per_source and sources:
        print("\n| data | preset | held-out source | PSNR |\n| --- | --- | --- | --- |")
        print("\n".join(sources))


if __name__ == "__main__":
    main()

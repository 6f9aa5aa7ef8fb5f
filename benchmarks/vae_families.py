"""Encode and decode speed of every diffusion VAE family aecli reads, beside diffusers' own class
on the same weights and the same images, in one run.

For each family (the diffusers class, in one or more releases) a random-init model is built by
diffusers at the release's widths (`--size release`: SD's 128/256/512/512, TAESD's 64, FLUX.2's,
DC-AE f32c32 SANA 1.0, the Qwen-Image VAE, Wan 2.1 and 2.2, HunyuanImage 2.1) or at test widths
(`--size small`), saved with save_pretrained, and both sides read that folder. Random weights:
speed does not depend on training. `--images` PNGs of `--image` pixels a side (crops of
scikit-learn's sample photos) are encoded, and diffusers' latents of them decoded:

- model alone: aecli's `Predictor.encode` / `Predictor.decode` (what its commands call: uint8
  images in, float latents out; latents in, uint8 images out) against diffusers' class called as
  its pipelines call it (posterior mode or the deterministic latent; the video VAEs, Wan and
  Qwen-Image, on (B, C, 1, H, W)), with the same conversions from and to uint8 and the same copies
  to and from the device, on one batch of all the images;
- whole command: `aecli encode` (a folder of PNGs to a latent .safetensors) and `aecli decode`
  (that file to a folder of PNGs), each a subprocess, start-up and model loading included, against
  a plain diffusers script doing the same work (this file's `--plain` mode: from_pretrained, the
  PNGs read with Pillow, batches under inference_mode, latents saved with safetensors / PNGs
  written with Pillow), with the same batch size; with each side's peak resident memory (the
  process's high-water mark, over its runs).

Milliseconds per image, medians of `--repeats` (aecli and diffusers alternating), warm-up runs
excluded; speed-up is diffusers' time over aecli's (above 1: aecli is faster). Both run at the same
dtype on the same device: by default what aecli's own policy picks for these models (fp32 on the
CPU, bf16 on a GPU with bf16 tensor cores; diffusers then holds its weights in that dtype, as
pipelines loaded with torch_dtype do). aecli's commands have no precision flag: a `--dtype` other
than their policy applies to the model-alone columns only, and the table says so.

A family that aecli.io.vae_families.FAMILIES does not have (yet) is skipped with a line.

    python benchmarks/vae_families.py --size small                       # a quick run
    python benchmarks/vae_families.py --size release --image 256 --images 2 --device cpu
    python benchmarks/vae_families.py --size release --device cuda --image 512 --images 8
    python benchmarks/vae_families.py --families AutoencoderKL,AutoencoderDC --commands none
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# -- the families: diffusers class -> {release: (its config at release widths, at test widths)}
# Random init either way; the release configs are those of the released config.json files
# (diffusers' defaults where they are the release's). Latent statistics are left at their
# defaults: they do not change the work.

_KL_SD = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
_KL_SMALL = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
_TINY_SMALL = dict(
    encoder_block_out_channels=(16, 16, 16, 16),
    decoder_block_out_channels=(32, 32, 32, 32),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
)
_DC_SANA = dict(  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv",  # as the release spells it (diffusers: not pixel_unshuffle)
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
_DC_SMALL = dict(
    _DC_SANA,
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(16, 32, 32),
    decoder_block_out_channels=(16, 32, 32),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,)),
    decoder_qkv_multiscales=((), (), (5,)),
)
_WAN21 = dict(  # also the Qwen-Image VAE's: diffusers' defaults for both classes
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
_WAN_SMALL = dict(
    base_dim=16,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)
_WAN22 = dict(  # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (statistics left neutral)
    _WAN21,
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    in_channels=12,
    out_channels=12,
    is_residual=True,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
_WAN22_SMALL = dict(
    _WAN_SMALL,
    decoder_base_dim=24,
    z_dim=8,
    in_channels=12,
    out_channels=12,
    is_residual=True,
    patch_size=2,
    scale_factor_spatial=16,
    latents_mean=[0.0] * 8,
    latents_std=[1.0] * 8,
)
_HUNYUAN = dict(  # hunyuanvideo-community/HunyuanImage-2.1-Diffusers vae/config.json
    in_channels=3,
    out_channels=3,
    latent_channels=64,
    block_out_channels=(128, 256, 512, 512, 1024, 1024),
    layers_per_block=2,
    spatial_compression_ratio=32,
    sample_size=384,
    scaling_factor=0.75289,
    downsample_match_channel=True,
    upsample_match_channel=True,
)
_HUNYUAN_SMALL = dict(
    _HUNYUAN,
    latent_channels=8,
    block_out_channels=(32, 32, 64, 64),  # its GroupNorms have 32 groups
    layers_per_block=1,
    spatial_compression_ratio=8,
    sample_size=64,
)

RELEASES: dict[str, dict[str, tuple[dict, dict]]] = {
    "AutoencoderKL": {"SD 1.x/2.x, SDXL": (_KL_SD, _KL_SMALL)},
    "AutoencoderTiny": {"TAESD": ({}, _TINY_SMALL)},
    "AutoencoderKLFlux2": {"FLUX.2": ({}, dict(_KL_SMALL, latent_channels=8))},
    "AutoencoderDC": {"DC-AE f32c32 SANA 1.0": (_DC_SANA, _DC_SMALL)},
    "AutoencoderKLQwenImage": {"Qwen-Image": (_WAN21, _WAN_SMALL)},
    "AutoencoderKLWan": {"Wan 2.1": (_WAN21, _WAN_SMALL), "Wan 2.2": (_WAN22, _WAN22_SMALL)},
    "AutoencoderKLHunyuanImage": {"HunyuanImage 2.1": (_HUNYUAN, _HUNYUAN_SMALL)},
}

# how each class is called, as its pipelines call it: the encoder output's attribute for the
# latent (a posterior, whose mode is taken, or the latent itself), and whether it takes video
# (B, C, T, H, W), here with T = 1
CALLS: dict[str, tuple[str, bool]] = {
    "AutoencoderKL": ("latent_dist", False),
    "AutoencoderTiny": ("latents", False),
    "AutoencoderKLFlux2": ("latent_dist", False),
    "AutoencoderDC": ("latent", False),
    "AutoencoderKLQwenImage": ("latent_dist", True),
    "AutoencoderKLWan": ("latent_dist", True),
    "AutoencoderKLHunyuanImage": ("latent_dist", False),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(name: str, config: dict, folder: Path) -> None:
    """A random-init diffusers `name` with `config`, saved to `folder`."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    getattr(diffusers, name)(**config).eval().save_pretrained(folder)


# -- diffusers, called as pipelines do (also the plain script's calls)


def to_model(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, C, H, W) anywhere -> [-1, 1] on the device, in `dtype`."""
    return images.to(device).to(dtype) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, as pipelines' image processors do (clamp, scale, round)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.inference_mode()
def diffusers_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the latents its pipelines take before scaling (posterior mode, or the
    deterministic latent), float32 on the device; (B, C, 1, h, w) for a video VAE."""
    attribute, video = CALLS[type(vae).__name__]
    x = to_model(images, vae.device, vae.dtype)
    out = getattr(vae.encode(x[:, :, None] if video else x), attribute)
    return (out.mode() if attribute == "latent_dist" else out).float()


@torch.inference_mode()
def diffusers_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents as diffusers_encode gives them -> uint8 images (B, C, H, W) on the device."""
    _, video = CALLS[type(vae).__name__]
    image = vae.decode(z.to(vae.device, vae.dtype)).sample
    return to_uint8(image[:, :, 0] if video else image)


def load_diffusers(folder: Path, device: torch.device, dtype: torch.dtype):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its notes on accelerate and unused keys
    name = json.loads((folder / "config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype).to(device).eval()


def plain(args) -> None:
    """The plain diffusers script (run as a subprocess): `encode` a folder of PNGs into a
    latent .safetensors, or `decode` one into a folder of PNGs, in batches of --batch."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    device = torch.device(args.device)
    vae = load_diffusers(args.model, device, DTYPES[args.dtype])
    batch = args.batch
    if args.plain == "encode":
        files = sorted(args.input.glob("*.png"))
        latents = []
        for i in range(0, len(files), batch):
            arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files[i : i + batch]]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            latents.append(diffusers_encode(vae, images).cpu())
        save_file({"latents": torch.cat(latents).contiguous()}, args.output)
    else:
        latents = load_file(args.input)["latents"]
        args.output.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(latents), batch):
            images = diffusers_decode(vae, latents[i : i + batch]).permute(0, 2, 3, 1).cpu()
            for j, image in enumerate(images.numpy()):
                Image.fromarray(image).save(args.output / f"{i + j:05d}.png")


# -- timing


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
        except (OSError, StopIteration):
            pass
    import importlib.metadata

    import diffusers

    import aecli

    try:
        accelerate = f"accelerate {importlib.metadata.version('accelerate')}"
    except importlib.metadata.PackageNotFoundError:
        accelerate = "no accelerate"
    return (
        f"{device.type}: {name} ({os.cpu_count()} cores); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; "
        f"diffusers {diffusers.__version__} ({accelerate}); aecli {aecli.__version__}; Python "
        f"{platform.python_version()}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def timed(runs: dict[str, object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median seconds of each run, `warmup` untimed calls of each first, then `repeats`
    timed, the runs alternating."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    found: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            found[name].append(seconds(run, device))
    return {name: statistics.median(values) for name, values in found.items()}


def write_images(folder: Path, count: int, side: int) -> torch.Tensor:
    """`count` PNGs of side x side (crops of scikit-learn's sample photos, resized), and the
    same images as uint8 (N, 3, side, side)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = []
    for i in range(count):
        photo = photos[i % len(photos)]
        crop = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
        top = int(rng.integers(0, photo.shape[0] - crop + 1))
        left = int(rng.integers(0, photo.shape[1] - crop + 1))
        image = Image.fromarray(photo[top : top + crop, left : left + crop]).resize(
            (side, side), Image.Resampling.BICUBIC
        )
        image.save(folder / f"{i:05d}.png")
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def model_alone(folder: Path, images: torch.Tensor, args) -> tuple[dict, str | None]:
    """(median seconds of one batch of every image: {direction: {side: s}}, the execution
    aecli's commands run where `--dtype` made the model alone's another, else None)."""
    from aecli.devices import Execution
    from aecli.inference import Predictor

    device, dtype = args.device, args.torch_dtype
    predictor = Predictor(folder, device)
    predictor.set_tiling(None, None, 1)  # the commands' default: tiles only where it won't fit
    policy = None
    if predictor.execution.autocast_dtype != (None if dtype == torch.float32 else dtype):
        policy = predictor.execution.describe()
        precision = "fp32" if dtype == torch.float32 else "bf16"
        predictor.execution = Execution(device, precision, predictor.execution.layout)
    vae = load_diffusers(folder, device, dtype)
    z = diffusers_encode(vae, images).cpu()
    _, video = CALLS[type(vae).__name__]
    z_aecli = z[:, :, 0] if video else z
    encode = timed(
        {
            "diffusers": lambda: diffusers_encode(vae, images),
            "aecli": lambda: predictor.encode(images),
        },
        device,
        args.repeats,
        args.warmup,
    )
    decode = timed(
        {
            "diffusers": lambda: diffusers_decode(vae, z),
            "aecli": lambda: predictor.decode(z_aecli),
        },
        device,
        args.repeats,
        args.warmup,
    )
    return {"encode": encode, "decode": decode}, policy


# Runs a command and writes its peak resident memory (kB) to the file argv[1]. A child's own
# ru_maxrss starts at its parent's when it is spawned (vfork then exec keeps the parent's
# high-water mark): this small process stands between, so that the figure is the command's.
_PEAK_OF = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def command_seconds(command: list[str], peaks: dict[str, int], side: str) -> float:
    """Wall seconds of one run of `command`; its peak resident memory raises `peaks[side]`."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_OF, str(peak), *command], capture_output=True, text=True
        )
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"exit {done.returncode} from {shlex.join(command[1:4])}: {last}")
        kilobytes = int(peak.read_text())
    peaks[side] = max(peaks.get(side, 0), kilobytes * 1024)  # Linux: ru_maxrss in kB
    return elapsed


def commands(folder: Path, pngs: Path, work: Path, args, warmup: int) -> dict:
    """Median wall seconds of the whole commands, and each side's peak resident memory over
    its runs: {direction: {side: s, "peak": {side: bytes}}}."""
    python, device, batch = sys.executable, str(args.device), str(args.batch)
    common = ["--device", device, "--batch-size", batch, "--overwrite"]
    plain_common = ["--plain-model", str(folder), "--device", device, "--batch", batch]
    plain_common += ["--dtype", args.dtype]
    ours, theirs = work / "aecli.safetensors", work / "diffusers.safetensors"
    runs = {
        "encode": {
            "aecli": [python, "-m", "aecli", "encode", str(folder), str(pngs), "-o", str(ours),
                      "--size", "native", *common],
            "diffusers": [python, __file__, "--plain", "encode", "--plain-input", str(pngs),
                          "--plain-output", str(theirs), *plain_common],
        },
        "decode": {
            "aecli": [python, "-m", "aecli", "decode", str(folder), str(ours), "-o",
                      str(work / "aecli-png"), *common],
            "diffusers": [python, __file__, "--plain", "decode", "--plain-input", str(theirs),
                          "--plain-output", str(work / "diffusers-png"), *plain_common],
        },
    }  # fmt: skip
    found = {}
    for direction, sides in runs.items():
        peaks: dict[str, int] = {}
        found[direction] = timed(
            {
                side: lambda c=command, s=side, p=peaks: command_seconds(c, p, s)
                for side, command in sides.items()
            },
            torch.device("cpu"),  # each process waits for its own device
            args.command_repeats,
            warmup,
        )
        found[direction]["peak"] = peaks
    return found


def print_header(args) -> None:
    print(machine(args.device))
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"{args.images} image(s) of {args.image}x{args.image} (PNG), batch {args.batch}, "
        f"{args.dtype}, models at {args.size} size (random init); ms per image, median of "
        f"{args.repeats} after {args.warmup} warm-up; speed-up: diffusers' time over aecli's "
        "(above 1: aecli is faster); whole commands: wall time per image, start-up and loading "
        f"included, median of {args.command_repeats} (warm-up: {args.command_warmup} run of "
        "each, first family only)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="all", help="diffusers class names, a,b (all)")
    parser.add_argument("--size", choices=["small", "release"], default="release")
    parser.add_argument("--image", type=int, default=512, help="the images' side, pixels")
    parser.add_argument("--images", type=int, default=4, help="images per run")
    parser.add_argument("--batch", type=int, default=None, help="default: every image at once")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of the model first")
    parser.add_argument(
        "--command-warmup",
        type=int,
        default=1,
        help="untimed runs of each whole command first, for the first family only (caches)",
    )
    parser.add_argument(
        "--command-repeats", type=int, default=None, help="whole-command runs (--repeats)"
    )
    parser.add_argument(
        "--commands", default="all", help="families whose whole commands are timed: a,b, all, none"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="default: what aecli's commands run (fp32 on the CPU, bf16 on recent GPUs)",
    )
    parser.add_argument("--plain", choices=["encode", "decode"], help=argparse.SUPPRESS)
    parser.add_argument("--plain-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain-input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        args.model, args.input, args.output = args.plain_model, args.plain_input, args.plain_output
        return plain(args)
    compare(args)


def compare(args) -> None:
    from aecli.devices import execution_plan, has_bf16_tensor_cores, resolve_device
    from aecli.io.vae_families import FAMILIES

    args.device = resolve_device(args.device)
    args.batch = args.batch or args.images
    if args.command_repeats is None:
        args.command_repeats = args.repeats
    if args.dtype == "auto":  # aecli's policy for a large model on this device
        cores = args.device.type == "cuda" and has_bf16_tensor_cores(args.device)
        autocast, _ = execution_plan(args.device.type, "auto", "auto", None, bf16_cores=cores)
        args.dtype = "float32" if autocast is None else "bfloat16"
    args.torch_dtype = DTYPES[args.dtype]
    print_header(args)
    wanted = None if args.families == "all" else set(args.families.split(","))
    unknown = (wanted or set()) - set(RELEASES)
    if unknown:
        sys.exit(f"--families: no {', '.join(sorted(unknown))}; known: {', '.join(RELEASES)}")
    with_commands = {"all": None, "none": set()}.get(args.commands, set(args.commands.split(",")))
    for name in RELEASES:
        if (wanted is None or name in wanted) and name not in FAMILIES:
            print(f"skipped {name}: aecli.io.vae_families.FAMILIES does not have it (yet)")
    print(
        "\n| family | release | | diffusers model | aecli model | speed-up | diffusers script "
        "| aecli command | speed-up | diffusers peak | aecli peak |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    policies, command_warmup, failed = set(), args.command_warmup, []
    with tempfile.TemporaryDirectory(prefix="aecli-vae-families-") as tmp:
        tmp = Path(tmp)
        images = write_images(tmp / "pngs", args.images, args.image)
        for name, releases in RELEASES.items():
            if (wanted is not None and name not in wanted) or name not in FAMILIES:
                continue
            for release, (release_config, small_config) in releases.items():
                folder = tmp / "models" / re.sub(r"[^A-Za-z0-9.]+", "-", f"{name}-{release}")
                start = time.perf_counter()
                build(name, release_config if args.size == "release" else small_config, folder)
                phases = [f"built and saved {time.perf_counter() - start:.0f} s"]
                try:
                    start = time.perf_counter()
                    alone, policy = model_alone(folder, images, args)
                    phases.append(f"model alone {time.perf_counter() - start:.0f} s")
                    whole = None
                    if with_commands is None or name in with_commands:
                        start = time.perf_counter()
                        work = tmp / "work" / folder.name
                        work.mkdir(parents=True)
                        whole = commands(folder, tmp / "pngs", work, args, command_warmup)
                        command_warmup = 0
                        phases.append(f"commands {time.perf_counter() - start:.0f} s")
                except Exception as exc:  # one family's failure is a row; the others still run
                    failed.append(name)
                    reason = " ".join(str(exc).split())[:300]
                    print(f"| {name} | {release} | failed: {type(exc).__name__}: {reason} |")
                    continue
                finally:
                    shutil.rmtree(folder)
                    gc.collect()
                    if args.device.type == "cuda":
                        torch.cuda.empty_cache()
                    print(f"{name} ({release}): {', '.join(phases)}", file=sys.stderr)
                if policy is not None:
                    policies.add(policy)
                for direction in ("encode", "decode"):
                    row = [name, release, direction, *cells(alone[direction], args.images)]
                    row += ["-"] * 5 if whole is None else cells(whole[direction], args.images)
                    if whole is not None:
                        peak = whole[direction]["peak"]
                        row += [f"{peak[side] / 2**30:.2f} GiB" for side in ("diffusers", "aecli")]
                    print("| " + " | ".join(row) + " |", flush=True)
    if policies:
        print(
            f"\nnote: the model-alone columns run at {args.dtype}; aecli's commands have no "
            f"precision flag and ran their own policy ({', '.join(sorted(policies))})"
        )
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def cells(found: dict[str, float], count: int) -> list[str]:
    """(diffusers ms/image, aecli ms/image, speed-up) for {side: seconds} of `count` images."""
    theirs, ours = found["diffusers"] / count * 1e3, found["aecli"] / count * 1e3
    return [f"{theirs:,.1f}", f"{ours:,.1f}", f"{theirs / ours:.2f}x"]


if __name__ == "__main__":
    main()

"""Feed aecli thousands of doctored headers and check that each is read or refused in one line.

Seeds: a diffusers AutoencoderKL folder's `config.json`, an aecli weights file's metadata (its
stored config, data, metrics, class names), the safetensors header of that file (tensor dtypes,
shapes, offsets), and a latent file's metadata (sources, class names, scaling, latent shape).
Each mutant changes one value somewhere in that JSON: a type swapped (a string, a list, an
object, null, a boolean where a number goes), a number made huge, negative, fractional or NaN,
a key removed or an unknown one added, or a value nested thousands of levels deep.

Every mutant goes through the commands that read it, in this process (so that 10,000 cases take
minutes, not hours) under an address-space limit (`--limit-gb`, 6 by default: a header that makes
aecli allocate without bound ends as a MemoryError, counted as a defect, instead of taking the
machine): `info` and `reconstruct` for weights and config.json, `decode` for latent files.
Reported: internal errors and Python exceptions (each one a defect), refusals that are not
one line with exit 2, and the peak resident memory of a case above the baseline (Linux's VmHWM,
reset before each case), against the stated bound.

    python benchmarks/fuzz_headers.py                  # 10,000 mutants
    python benchmarks/fuzz_headers.py --cases 2000 --seed 3

Needs the test extra (diffusers) for the config.json seed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from aecli.cli import app
from aecli.errors import AecliError
from aecli.io.tensorfile import safetensors_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import TINY  # noqa: E402  (the tests' tiny preset: trains in seconds)

BOUND_MB = 512  # a case may take at most this much memory above the baseline


def rss_peak_reset() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def rss_peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def mutate(value, rng: random.Random, depth: int = 0):
    """`value` with one thing in it changed (at a random place)."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        action = rng.random()
        if action < 0.1:
            del out[key]
        elif action < 0.15:
            out[f"extra_{rng.randrange(100)}"] = replacement(rng)
        else:
            out[key] = mutate(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        index = rng.randrange(len(out))
        if rng.random() < 0.1:
            out.append(replacement(rng))
        else:
            out[index] = mutate(out[index], rng, depth + 1)
        return out
    if isinstance(value, str) and rng.random() < 0.5:  # JSON inside a metadata string
        try:
            inner = json.loads(value)
        except ValueError:
            inner = None
        if inner is not None:
            return json.dumps(mutate(inner, rng, depth + 1), allow_nan=True)
    return replacement(rng, value)


def replacement(rng: random.Random, old=None):
    choice = rng.randrange(14)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return "x" * rng.choice([0, 1, 10, 10_000])
    if choice == 3:
        return 10 ** rng.choice([3, 6, 9, 12, 18, 30, 100, 400])
    if choice == 4:
        return -rng.randrange(1, 10**6)
    if choice == 5:
        return rng.choice([0.5, 4.5, -0.25, 1e300])
    if choice == 6:
        return float("nan")
    if choice == 7:
        return [] if rng.random() < 0.5 else [1] * rng.choice([1, 100, 20_000])
    if choice == 8:
        return {}
    if choice == 9:
        return DEEP if rng.random() < 0.5 else "[" * 50_000
    if choice == 10 and isinstance(old, int | float) and not isinstance(old, bool):
        return str(old)
    if choice == 11 and isinstance(old, int) and not isinstance(old, bool):
        return old * rng.choice([2, 1000, 10**6]) + rng.choice([0, 1])
    if choice == 12:
        return 0
    return rng.choice(["F8_E4M3", "F64", "I8", "BOOL", "latents", "../x", "\x1b[2J", "[red]"])


DEEP = "__deep__"  # stands for 50,000 nested lists, written into the JSON text as such
DEEP_TEXT = "[" * 50_000 + "]" * 50_000


def dumps(value) -> str:
    """JSON text of `value`, DEEP markers made deep (also inside JSON held in strings)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=True)
    return text.replace(f'"{DEEP}"', DEEP_TEXT).replace(f'\\"{DEEP}\\"', DEEP_TEXT)


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def seeds(tmp: Path) -> dict:
    """The seed files: a tiny trained model's weights, a diffusers VAE folder, a latent file."""
    runner = CliRunner()
    run = tmp / "run"
    preset = tmp / "tiny.yaml"
    preset.write_text(TINY)
    result = runner.invoke(
        app, ["train", str(preset), "--out", str(run), "--epochs", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    weights = run / "model.safetensors"
    image = tmp / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(image)
    latents = tmp / "z.safetensors"
    assert (
        runner.invoke(app, ["encode", str(weights), str(image), "-o", str(latents)]).exit_code == 0
    )
    import diffusers
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, sample_size=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )  # fmt: skip
    vae.save_pretrained(tmp / "vae")
    return {"weights": weights, "latents": latents, "vae": tmp / "vae", "image": image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit-gb", type=float, default=6.0, help="address-space limit")
    parser.add_argument("--debug", action="store_true", help="print each defect's traceback")
    args = parser.parse_args()
    limit = int(args.limit_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rng = random.Random(args.seed)
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = seeds(tmp)
        weights_data = found["weights"].read_bytes()
        weights_header, length = safetensors_header(weights_data)
        weights_tensors = weights_data[8 + length :]
        latent_data = found["latents"].read_bytes()
        latent_header, length = safetensors_header(latent_data)
        latent_tensors = latent_data[8 + length :]
        config = json.loads((found["vae"] / "config.json").read_text())
        case_dir = tmp / "case"
        case_dir.mkdir()
        # the baseline: every command once on the untouched seeds
        for command in (["info", str(found["weights"])], ["info", str(found["vae"])]):
            runner.invoke(app, command)
        baseline = rss_peak_mb()
        outcomes: Counter[str] = Counter()
        defects: list[str] = []
        worst = 0.0
        started = time.perf_counter()
        for case in range(args.cases):
            kind = rng.choice(["config", "metadata", "tensors", "latents"])
            if kind == "config":
                target = case_dir / "vae"
                target.mkdir(exist_ok=True)
                weights_file = found["vae"] / "diffusion_pytorch_model.safetensors"
                link = target / "diffusion_pytorch_model.safetensors"
                if not link.exists():
                    link.symlink_to(weights_file)
                (target / "config.json").write_text(dumps(mutate(config, rng)))
                commands = [["info", str(target)],
                            ["reconstruct", str(target), str(found["image"]), "-o",
                             str(case_dir / "out"), "--overwrite"]]  # fmt: skip
            elif kind in ("metadata", "tensors"):
                header = copy.deepcopy(weights_header)
                if kind == "metadata":
                    header["__metadata__"] = mutate(header["__metadata__"], rng)
                else:
                    name = rng.choice([k for k in header if k != "__metadata__"])
                    header[name] = mutate(header[name], rng)
                target = case_dir / "w.safetensors"
                write_safetensors(target, header, weights_tensors)
                commands = [["info", str(target)],
                            ["reconstruct", str(target), str(found["image"]), "-o",
                             str(case_dir / "out"), "--overwrite"]]  # fmt: skip
            else:
                header = copy.deepcopy(latent_header)
                header["__metadata__"] = mutate(header["__metadata__"], rng)
                target = case_dir / "z.safetensors"
                write_safetensors(target, header, latent_tensors)
                commands = [["decode", str(found["weights"]), str(target), "-o",
                             str(case_dir / "dec"), "--overwrite"]]  # fmt: skip
            for command in commands:
                rss_peak_reset()
                try:
                    given = ["--debug", *command] if args.debug else command
                    result = runner.invoke(app, given, catch_exceptions=True)
                except BaseException as exc:  # noqa: BLE001 (a crash of the runner itself)
                    defects.append(f"case {case} {kind} {command[0]}: {type(exc).__name__}")
                    continue
                worst = max(worst, rss_peak_mb() - baseline)
                lines = result.stderr.strip().splitlines() if result.stderr else []
                if isinstance(result.exception, AecliError):  # --debug re-raises refusals too
                    outcomes["refused in one line"] += result.exception.exit_code == 2
                    outcomes["other"] += result.exception.exit_code != 2
                elif result.exception is not None and not isinstance(result.exception, SystemExit):
                    text = "".join(traceback.format_exception(result.exception))
                    if args.debug:
                        print(text[-1500:], flush=True)
                    defects.append(
                        f"case {case} {kind} {command[0]}: {text.splitlines()[-1][:200]}"
                    )
                    outcomes["exception"] += 1
                elif any("internal error" in line for line in lines):
                    defects.append(f"case {case} {kind} {command[0]}: {lines[-1][:200]}")
                    outcomes["internal error"] += 1
                elif result.exit_code == 0:
                    outcomes["read"] += 1
                elif result.exit_code == 2 and len(lines) == 1:
                    outcomes["refused in one line"] += 1
                else:
                    defects.append(
                        f"case {case} {kind} {command[0]}: exit {result.exit_code}, "
                        f"{len(lines)} lines: {(lines or [''])[-1][:160]}"
                    )
                    outcomes["other"] += 1
            if (case + 1) % 1000 == 0:
                print(f"{case + 1:,} cases, {time.perf_counter() - started:.0f} s, "
                      f"{dict(outcomes)}", flush=True)  # fmt: skip
        seconds = time.perf_counter() - started
        print(f"\n{args.cases:,} mutants, {sum(outcomes.values()):,} command runs in "
              f"{seconds:.0f} s (seed {args.seed}): {dict(outcomes)}")  # fmt: skip
        print(f"address-space limit: {args.limit_gb:g} GiB")
        print(f"peak memory above the baseline ({baseline:.0f} MB): {worst:.0f} MB "
              f"(bound {BOUND_MB} MB)")  # fmt: skip
        print(f"defects: {len(defects)}")
        for line in Counter(d.split(": ", 1)[1] for d in defects).most_common(20):
            print(f"  {line[1]} x {line[0]}")
        sys.exit(1 if defects or worst > BOUND_MB else 0)


if __name__ == "__main__":
    main()

"""`aecli presets` and `aecli info`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from aecli.cli.options import complete_preset
from aecli.cli.render import fmt_metric, key_value_table, print_json, results

PRESETS_EXAMPLES = """
[bold]Example[/bold]

  aecli presets --json
"""

INFO_EXAMPLES = """
[bold]Examples[/bold]

  aecli info cifar-cae
  aecli info runs/cifar-res-20261122-101500/model.safetensors --json
"""


def presets(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the list as JSON on stdout.")
    ] = False,
) -> None:
    """List the bundled presets with a one-line description and measured quality each.

    The quality is the held-out PSNR that benchmarks/quality.py measured, where it did."""
    from aecli.config import DEFAULT_ALIAS, DEFAULT_PRESET, list_presets

    found = list_presets()
    if as_json:
        print_json(
            [
                {
                    "name": p.name,
                    "description": p.description,
                    "quality": p.quality or None,
                    "default": p.name == DEFAULT_PRESET,
                }
                for p in found
            ]
        )
        return
    table = Table(title="Bundled presets", title_justify="left")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    table.add_column("measured (benchmarks/quality.py)")
    for preset in found:
        name = preset.name + (f"\n({DEFAULT_ALIAS})" if preset.name == DEFAULT_PRESET else "")
        description = preset.description.removeprefix(f"{preset.name}:").strip()
        table.add_row(name, escape(description), escape(preset.quality))
    results.print(table)


def info(
    target: Annotated[
        str,
        typer.Argument(
            autocompletion=complete_preset,
            metavar="TARGET",
            help="A weights file (model.safetensors), a bundled preset name, a YAML preset, a "
            "latent file or a latent folder (`aecli encode -o DIR/`).",
            show_default=False,
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the facts as JSON on stdout.")
    ] = False,
) -> None:
    """Describe a model: architecture, parameter counts, latent shape, compression ratio.

    For a weights file, also the data it was trained on, its classes and its final metrics.
    """
    from aecli.config import load_config

    # a preset name (or a path that is not there) is read, or refused, before torch loads
    loaded = None if os.path.lexists(target) else load_config(target)
    from aecli.io.latent_folder import is_latent_folder
    from aecli.io.latents import is_latent_file

    path = Path(target)
    if is_latent_folder(path):
        _folder_info(path, as_json)
        return
    if is_latent_file(path):
        _latent_file_info(path, as_json)
        return
    facts, family, scaling = _model_facts(target, loaded)
    if as_json:
        print_json(facts)
        return
    _print_model_info(target, facts, family, scaling)


def _model_facts(target: str, loaded) -> tuple[dict, object, object]:
    """What `aecli info` says of a weights file or a preset (`loaded`, if read already): its
    facts, and the family (None: aecli's own) and latent scaling they name."""
    from dataclasses import asdict

    from aecli.config import load_config
    from aecli.devices import ModelCost, describe_plan, execution_plan
    from aecli.io.vae_families import OWN, family_of
    from aecli.io.weights import read_weights
    from aecli.models import build_model, summarize

    path = Path(target)
    weights = (
        path.suffix == ".safetensors"
        or path.is_dir()
        or path.is_symlink()
        or (path.is_file() and path.suffix not in (".yaml", ".yml"))
    )
    facts: dict = {"source": target, "kind": "weights" if weights else "preset"}
    if weights:
        stored, tensors = read_weights(path)
        config = stored.config
        facts.update(
            preset=stored.preset,
            aecli_version=stored.aecli_version,
            fingerprint=stored.fingerprint,
            data=stored.data,
            class_names=stored.class_names,
            metrics=stored.metrics,
        )
    else:
        loaded = loaded or load_config(target)
        config, tensors = loaded.config, None
        facts.update(preset=loaded.name)
    model = build_model(config, meta=True)
    summary = asdict(summarize(config, model))
    facts.update(summary)
    cost = ModelCost.of(config, model)
    train = config.train
    facts["cuda_execution"] = describe_plan(
        "cuda", *execution_plan("cuda", train.precision, train.memory_format, cost)
    )
    facts["layers"] = _layers(model, config)
    family, _ = family_of(config)
    convention = OWN if family is None else family.convention
    latent = config.model.latent
    scaling = convention.scaling(latent, tensors)
    facts["family"] = None if family is None else family.name
    facts["deterministic"] = None if family is None else family.deterministic
    facts["latent_convention"] = {
        "kind": convention.kind,
        **scaling.record(),
        "scaled_shape": list(scaling.scaled_shape(tuple(summary["latent_shape"]))),
        "description": convention.describe(latent, tensors),
    }
    return facts, family, scaling


def _print_model_info(target: str, facts: dict, family, scaling) -> None:
    """`aecli info` of a model, for a person: its facts as a table, then its layers."""
    from aecli.run.status import describe_source

    weights = facts["kind"] == "weights"
    kind = "VAE" if facts["variational"] else "autoencoder"
    rows = [
        ("model", f"{facts['preset']} ({kind}, {facts['latent_kind']} latent)"),
        ("input", "x".join(map(str, facts["input_shape"]))),
        ("latent", "x".join(map(str, facts["latent_shape"]))),
        ("compression", f"{facts['compression_ratio']:g}x"),
        ("compute", f"{facts['forward_gflops']:.4g} GFLOPs per image (forward; training ~3x)"),
        ("on CUDA", facts["cuda_execution"]),
        (
            "parameters",
            f"{facts['parameters']:,} (encoder {facts['encoder_parameters']:,}, "
            f"decoder {facts['decoder_parameters']:,})",
        ),
    ]
    if weights:
        imported = facts["data"].get("kind") in ("diffusers", "single-file")
        rows += [
            ("imported from" if imported else "trained on", describe_source(facts["data"])),
            ("classes", ", ".join(facts["class_names"] or []) or "none"),
            ("fingerprint", facts["fingerprint"]),
        ]
        rows += [] if imported else [("aecli", facts["aecli_version"])]
    imported_family = family if weights else None  # a preset's layout is no release's
    if imported_family is not None:
        what = "deterministic" if family.deterministic else "a VAE"
        rows.append(("family", f"{family.name} ({family.models}; {what})"))
    if imported_family is not None or not scaling.identity:
        scaled = "x".join(map(str, facts["latent_convention"]["scaled_shape"]))
        described = facts["latent_convention"]["description"]
        rows.append(("latent scaling", f"{described} (encode --scaled: {scaled})"))
    if weights:
        rows += [(k, fmt_metric(k, v)) for k, v in facts["metrics"].items() if k.startswith("val_")]
    results.print(key_value_table(target, rows))
    table = Table(title="Layers", title_justify="left")
    for column in ("part", "layer", "output", "parameters", "MFLOPs"):
        table.add_column(column, justify="right" if column in ("parameters", "MFLOPs") else "left")
    for layer in facts["layers"]:
        table.add_row(
            layer["part"],
            escape(layer["layer"]),
            "x".join(map(str, layer["output"])),
            f"{layer['parameters']:,}",
            f"{layer['gflops'] * 1e3:,.1f}",
        )
    results.print(table)


def _latent_file_info(path: Path, as_json: bool) -> None:
    """`aecli info FILE` for a latent file: count, shape, what it stores, model, scaling."""
    from aecli.io.latents import latent_file_facts

    facts = {"source": str(path), **latent_file_facts(path)}
    if as_json:
        print_json(facts)
        return
    shape = "x".join(map(str, facts["latent_shape"]))
    rows = [
        ("model", facts["fingerprint"] or "unknown (a .npy file)"),
        ("latents", f"{facts['count']:,} of {shape}"),
        ("stored", f"{', '.join(facts['stored'])} ({facts['dtype']})"),
        ("scaling", facts["scaling_described"] or "none"),
        ("classes", ", ".join(facts["class_names"] or []) or "none"),
    ]
    results.print(key_value_table(str(path), rows))  # it shows every value escaped


def _folder_info(path: Path, as_json: bool) -> None:
    """`aecli info DIR/` for a latent folder: count, shapes, scaling, model, size on disk."""
    from aecli.io.latent_folder import busy, folder_facts
    from aecli.io.latents import LatentScaling

    facts = {"source": str(path), **folder_facts(path)}
    if as_json:
        print_json(facts)
        return
    settings = facts.get("settings") or {}
    size = facts["bytes"]
    disk = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
    scaling = settings.get("scaling")
    try:
        scaled = "none" if not scaling else LatentScaling.from_record(scaling).describe()
    except ValueError:
        scaled = "damaged record"
    made = {
        True: "encoded (a VAE's posterior mean)",
        False: "encoded (the encoder's output)",
    }.get(facts.get("variational"), "encoded")
    if "sampled_from" in settings:
        made = f"sampled from {settings['sampled_from']} (seed {settings.get('seed')})"
    elif settings.get("store") == "sample":
        made = f"sampled from the posterior (seed {settings.get('seed')})"
    elif settings.get("store") == "moments":
        made = "encoded (a VAE's posterior mean; its standard deviation as latents_std)"
    if settings.get("flip"):
        made += "; each image's mirror image's as latents_flip"
    if settings.get("dtype"):
        made += f"; stored as {settings['dtype']}, computed in {settings.get('precision')}"
    rows = [("model", f"{facts['fingerprint']} ({facts['weights']})")]
    if facts["finished"]:
        shapes = ", ".join(
            f"{s['count']:,} of {'x'.join(map(str, s['shape']))}" for s in facts["shapes"]
        )
        shards = facts["shards"]
        rows += [
            ("latents", f"{facts['count']:,} in {shards:,} shard{'s' * (shards != 1)}"),
            ("shapes", shapes),
        ]
    else:
        done = f"{facts['units_done']} of {facts['units']} units of work on disk"
        if facts["writer"] is not None:
            state = f"{done}; {busy(facts['writer'])}"
        else:
            state = f"{done}; finish it with the same `aecli encode` and --resume"
        rows.append(("unfinished", state))
    rows += [
        ("latents are", made),
        ("scaling", scaled),
        ("size on disk", disk),
    ]
    if facts["finished"]:
        rows += [
            ("classes", ", ".join(facts["class_names"] or []) or "none"),
            ("failed inputs", f"{facts['failures']:,}"),
        ]
    results.print(key_value_table(str(path), rows))  # it shows every value escaped


def _layers(model, config) -> list[dict]:
    """Each block with its settings, output shape, parameters and forward FLOPs per image."""
    from aecli.models.builder import layers

    def text(spec) -> str:
        fields = spec.model_dump(exclude_defaults=True, exclude={"type", "repeat"})
        return " ".join([spec.type] + [f"{k}={v}" for k, v in fields.items()])

    latent = config.model.latent
    head = (
        f"{'conv 1x1' if latent.spatial else 'linear'} to " if latent.head else "encoder output as "
    )
    head += "mean and log-variance" if latent.variational else "the code"
    modules = [*model.encoder, model.latent_head, *model.decoder]
    return [
        {
            "part": layer.part,
            "layer": head if layer.spec is None else text(layer.spec),
            "output": list(layer.output),
            "parameters": sum(p.numel() for p in module.parameters()),
            "gflops": round(layer.flops / 1e9, 6),
        }
        for layer, module in zip(layers(config), modules, strict=True)
    ]

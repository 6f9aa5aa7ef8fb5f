import json
from pathlib import Path

import pytest

from aecli.config import dump_config, list_presets, load_config, parse_yaml
from aecli.errors import ConfigError, UsageError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def with_train(tiny_preset: Path, line: str) -> Path:
    text = tiny_preset.read_text().replace(
        "train: {epochs: 2, batch_size: 32, grid_images: 4}", line
    )
    return write(tiny_preset.parent, text)


def test_unknown_key_names_key_file_and_suggestion(tiny_preset, cli):
    path = with_train(tiny_preset, "train: {epoch: 2}")
    result = cli("train", path, "--out", path.parent / "run")
    assert result.exit_code == 2
    assert "unknown key 'train.epoch'" in result.stderr
    assert "did you mean 'train.epochs'?" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.output
    assert not (path.parent / "run").exists()


def test_unknown_key_inside_a_block_is_located(tiny_preset):
    text = tiny_preset.read_text().replace(
        "{type: conv, out: 3}", "{type: conv, out: 3, kernal: 5}"
    )
    path = write(tiny_preset.parent, text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "unknown key 'model.decoder.4.kernal'; did you mean 'model.decoder.4.kernel'?" in str(
        info.value
    )


def test_unknown_key_from_set_names_set(tiny_preset):
    with pytest.raises(ConfigError) as info:
        load_config(str(tiny_preset), ["model.latent.dimm=4"])
    message = str(info.value)
    assert message.startswith("--set: unknown key 'model.latent.dimm'")
    assert "did you mean 'model.latent.dim'?" in message


def test_wrong_type_names_key_expected_type_and_file(tiny_preset, cli):
    path = with_train(tiny_preset, "train: {epochs: ten}")
    result = cli("train", path)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert str(path) in line and "train.epochs" in line and "integer" in line and "'ten'" in line


def test_all_problems_are_reported_at_once(tiny_preset):
    path = with_train(tiny_preset, "train: {epochs: ten, batch_size: -1, sed: 3}")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert len(info.value.problems) == 3


def test_malformed_yaml_gives_line(tmp_path, cli):
    path = write(tmp_path, "data:\n  image_size: [32\nmodel: {}\n")
    result = cli("train", path)
    assert result.exit_code == 2
    assert "malformed YAML" in result.stderr and "line" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..epochs=3"])
def test_bad_set_syntax(tiny_preset, item):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(str(tiny_preset), [item])


def test_set_into_a_scalar_is_refused(tiny_preset):
    with pytest.raises(ConfigError, match="--set train.epochs.x"):
        load_config(str(tiny_preset), ["train.epochs.x=3"])


def test_set_values_are_parsed_as_yaml(tiny_preset):
    config = load_config(
        str(tiny_preset),
        ["optim.lr=1e-4", "data.augment.crop_scale=[0.5, 1.0]", "model.encoder.0.out=16"],
    ).config
    assert config.optim.lr == pytest.approx(1e-4)
    assert config.data.augment.crop_scale == (0.5, 1.0)
    assert config.model.encoder[0].out == 16


def test_scientific_notation_without_dot_is_a_float():
    assert parse_yaml("lr: 1e-3", "x")["lr"] == pytest.approx(1e-3)


def test_cross_field_rule_bce_needs_unit_range(tiny_preset):
    with pytest.raises(ConfigError, match="bce needs data.range unit"):
        load_config(str(tiny_preset), ["loss.reconstruction=bce", "data.range=symmetric"])


def test_unknown_preset_suggests_closest():
    with pytest.raises(UsageError, match="did you mean 'mnist-cae'"):
        load_config("mnist-ca")


def test_resolved_config_round_trips(tmp_path):
    config = load_config("dog-vae").config
    path = write(tmp_path, dump_config(config))
    assert load_config(str(path)).config == config


def test_every_bundled_preset_loads_and_has_a_header():
    names = {p.name for p in list_presets()}
    assert {
        "mnist-cae",
        "cifar-cae",
        "cifar-cae-1000",
        "fashion-vae",
        "dog-vae",
        "cat-kl-f8",
        "mnist-res",
        "cifar-res",
        "dog-res",
    } <= names
    for preset in list_presets():
        load_config(preset.name)
        assert preset.description.startswith(preset.name + ":")


def test_default_is_cifar_res_by_either_name():
    assert load_config().name == load_config("default").name == "cifar-res"
    assert load_config("default").config == load_config("cifar-res").config


def test_benchmarked_presets_carry_their_held_out_figures(cli):
    quality = {p.name: p.quality for p in list_presets()}
    for name in ("mnist-cae", "mnist-res", "cifar-cae", "cifar-res", "dog-vae", "dog-res"):
        assert "held-out PSNR" in quality[name] and " dB" in quality[name], name
    listing = json.loads(cli("presets", "--json").stdout)
    row = next(p for p in listing if p["name"] == "cifar-res")
    assert row["default"] and row["quality"] == quality["cifar-res"]

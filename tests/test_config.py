"""Config: the creators' keys, validation messages, precedence preset < file < command line, the template."""

from pathlib import Path

import pytest

from lora_studio.config import TrainConfig, load_config, parse_overrides, template_yaml
from lora_studio.errors import ConfigError
from lora_studio.presets import PRESET_DIR, list_presets, next_smaller_preset, recommend_preset

SEED_KEYS = {"train_data_dir": "data/style_train", "metadata_path": "data/style_train/metadata.csv",
             "base_model": "runwayml/stable-diffusion-v1-5", "lora_rank": 32, "batch_size": 2, "epochs": 5,
             "learning_rate": 5e-5, "output_dir": "out", "save_steps": 100,
             "target_modules": ["to_q", "to_v"]}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_creator_keys_load_exactly_as_written(tmp_path):
    import yaml

    cfg = load_config(write(tmp_path, yaml.safe_dump(SEED_KEYS)))
    for key, value in SEED_KEYS.items():
        assert getattr(cfg, key) == value
    assert cfg.alpha == 32.0  # alpha defaults to the rank


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "lerning_rate: 1e-4\n"))
    assert err.value.field == "lerning_rate"
    assert "learning_rate" in str(err.value)


@pytest.mark.parametrize("text, field, words", [
    ("lora_rank: 0\n", "lora_rank", "1 to 1024"),
    ("mixed_precision: fp8\n", "mixed_precision", "no, fp16, bf16"),
    ("batch_size: two\n", "batch_size", "whole number"),
    ("lora_dropout: 1.5\n", "lora_dropout", "0.0 to 1.0"),
    ("optimizer: sgd\n", "optimizer", "adamw8bit"),
    ("gradient_checkpointing: maybe\n", "gradient_checkpointing", "true or false"),
])
def test_bad_values_name_field_and_allowed_range(tmp_path, text, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.field == field
    assert words in str(err.value)


def test_broken_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "batch_size: 1\nepochs: [1,\n"))
    assert "line" in str(err.value)


@pytest.mark.parametrize("text", ["mixed_precision: no\n", "mixed_precision: false\n", "mixed_precision: 'no'\n",
                                  "mixed_precision: False\n"])
def test_mixed_precision_no_as_yaml_reads_it(tmp_path, text):
    """YAML reads a bare `no` (and `false`) as the boolean False: both mean mixed_precision 'no'."""
    cfg = load_config(write(tmp_path, text))
    assert cfg.mixed_precision == "no"
    saved = tmp_path / "saved.yaml"
    cfg.save(saved)
    assert load_config(saved).mixed_precision == "no"  # and it survives the run folder's config.yaml


@pytest.mark.parametrize("item", ["mixed_precision=no", "mixed_precision=false", "mixed_precision=No"])
def test_mixed_precision_no_on_the_command_line(item):
    assert load_config(overrides=parse_overrides([item])).mixed_precision == "no"
    with pytest.raises(ConfigError, match="'True' is not allowed"):
        load_config(overrides=parse_overrides(["mixed_precision=yes"]))


def test_binary_config_file_is_a_config_error(tmp_path, capsys):
    from lora_studio.__main__ import main

    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file") as err:
        load_config(binary)
    assert err.value.field == "config"
    assert main(["train", "--config", str(binary)]) == 2
    out = capsys.readouterr().err
    assert "not a text file" in out and "Traceback" not in out and "UnicodeDecodeError" not in out


def test_precedence_preset_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "batch_size: 3\nlearning_rate: 2e-4\n")
    cfg = load_config(path, preset="12gb", overrides=parse_overrides(["learning_rate=1e-5", "seed=7"]))
    assert cfg.optimizer == "adamw8bit" and cfg.gradient_checkpointing  # from the preset
    assert cfg.batch_size == 3  # the file beats the preset
    assert cfg.learning_rate == 1e-5 and cfg.seed == 7  # the command line beats the file


def test_aliases_from_other_trainers(tmp_path):
    cfg = load_config(write(tmp_path, "network_dim: 8\nnetwork_alpha: 4\ntrain_batch_size: 2\n"))
    assert (cfg.lora_rank, cfg.alpha, cfg.batch_size) == (8, 4.0, 2)


def test_roundtrip_yaml(tmp_path):
    cfg = TrainConfig(lora_rank=4, lora_alpha=2, target_modules=["to_q"], min_snr_gamma=5).validate()
    cfg.save(tmp_path / "x.yaml")
    assert load_config(tmp_path / "x.yaml") == cfg


def test_template_file_is_current_and_loads():
    text = (PRESET_DIR / "lora_default.yaml").read_text(encoding="utf-8")
    assert text == template_yaml(), "presets/lora_default.yaml is stale: regenerate it with template_yaml()"
    assert load_config(PRESET_DIR / "lora_default.yaml") == TrainConfig().validate()


def test_presets_are_partial_and_ordered():
    sd = list_presets("sd15")
    assert [p.name for p in sd][:3] == ["12gb", "16gb", "24gb"]
    for p in sd:
        TrainConfig().replace(**p.values)  # every preset key is a valid config key
        assert set(p.values) <= {"batch_size", "gradient_checkpointing", "mixed_precision", "optimizer",
                                 "cache_latents", "resolution", "gradient_accumulation_steps", "enable_bucket",
                                 "auto_fit", "lora_rank"}
    assert recommend_preset(23.6, "sd15").name == "24gb"  # a 24 GB card reports a little less
    assert recommend_preset(16.0, "sd15").name == "16gb"
    assert recommend_preset(8.0, "sd15").name == "12gb"  # the smallest, when nothing fits
    assert recommend_preset(None) is None
    assert next_smaller_preset("24gb").name == "16gb" and next_smaller_preset("12gb") is None


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError) as err:
        load_config(preset="8gb")
    assert "12gb" in str(err.value)

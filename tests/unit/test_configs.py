"""Every shipped config file parses against its command's schema (no stale keys)."""

from pathlib import Path

import pytest

from cybertron.config import TrainConfig, apply_toml
from cybertron.finetune.config import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["default.toml", "llama3-1b.toml", "llama3-8b.toml"])
def test_train_configs_parse(name):
    cfg = TrainConfig()
    apply_toml(cfg, CONFIGS / name)
    assert cfg.model.preset == name.removesuffix(".toml").replace("default", "nano")


def test_default_config_is_the_default():
    cfg = TrainConfig()
    apply_toml(cfg, CONFIGS / "default.toml")
    assert cfg == TrainConfig()  # the file documents the no-argument run exactly


def test_lora_sft_config_parses():
    cfg = FinetuneConfig()
    apply_toml(cfg, CONFIGS / "lora-sft.toml")
    assert cfg.finetune.method == "lora" and cfg.finetune.rank == 16


@pytest.mark.parametrize("name, method", [("dpo.toml", "dpo"), ("grpo.toml", "grpo"), ("reward.toml", "reward")])
def test_align_configs_parse_and_validate(name, method):
    from cybertron.align.config import AlignConfig, validate

    cfg = AlignConfig()
    apply_toml(cfg, CONFIGS / name)
    assert cfg.align.method == method
    cfg.model.path, cfg.data.path, cfg.align.reward = "m", "d.jsonl", "r.py:f"
    validate(cfg)  # the shipped values pass every check


def test_resolved_config_round_trips_strings_with_newlines_and_quotes(tmp_path):
    from cybertron.align.config import AlignConfig
    from cybertron.config import to_toml

    cfg = AlignConfig()
    cfg.align.stop, cfg.model.path = "\n", 'dir with "quotes" \\ and é'
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    again = AlignConfig()
    apply_toml(again, tmp_path / "c.toml")
    assert again == cfg

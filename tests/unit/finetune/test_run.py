"""The finetune command's config and run directory: shortcuts, a config.toml that reproduces the run, and a
clear error when an adapter run's base model has moved."""

import shutil

import pytest

from cybertron.config import parse_args
from cybertron.errors import CheckpointError, ConfigError
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig, validate

pytest.importorskip("transformers")

from cybertron.commands.finetune import run as run_finetune  # noqa: E402
from cybertron.runs import load_run  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir, write_chats  # noqa: E402


def test_shortcuts_expand_to_config_keys():
    argv = ["--model", "m", "--data=d.jsonl", "--method", "dora", "--rank", "4", "--steps", "3"]
    cfg = parse_args(argv, FinetuneConfig(), SHORTCUTS)
    assert (cfg.model.path, cfg.data.path, cfg.finetune.method, cfg.finetune.rank, cfg.train.steps) == \
        ("m", "d.jsonl", "dora", 4, 3)
    assert cfg.finetune.lora_spec().dora
    with pytest.raises(ConfigError, match="--model needs a value"):
        parse_args(["--model"], FinetuneConfig(), SHORTCUTS)


def test_frozen_base_is_stored_in_bf16_only_under_bf16_autocast():
    import torch

    from cybertron.finetune.model import base_dtype

    assert base_dtype("auto", "bf16", "lora") == torch.bfloat16
    assert base_dtype("auto", "bf16", "full") == torch.float32  # trained weights keep fp32 masters
    assert base_dtype("auto", "fp32", "qlora") == torch.float32
    cfg = parse_args(["--model.path=m", "--data.path=d", "--method=full", "--model.dtype=bfloat16"],
                     FinetuneConfig(), SHORTCUTS)
    with pytest.raises(ConfigError, match="model.dtype=bf16 needs an adapter method"):
        validate(cfg)


@pytest.mark.parametrize("override, fragment", [("--finetune.method=prefix", "finetune.method"),
                                                ("--finetune.rank=0", "finetune.rank"),
                                                ("--finetune.dropout=1.5", "finetune.dropout"),
                                                ("--data.val_fraction=1", "data.val_fraction"),
                                                ("--data.format=jsonl", "data.format must be one of auto, chat")])
def test_invalid_values_name_their_key(override, fragment):
    cfg = parse_args(["--model.path=m", "--data.path=d", override], FinetuneConfig())
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)


def test_run_dir_reproduces_and_needs_its_base(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", "llama")
    chats = write_chats(tmp_path / "chats.jsonl", n=8)
    args = ["--model", str(hf), "--data", str(chats), "--steps", "2", "--out", str(tmp_path / "run"),
            "--seq-len", "96", "--log.tensorboard", "false", "--log.progress", "lines"]
    run = run_finetune(parse_args(args, FinetuneConfig(), SHORTCUTS))
    # the saved config.toml parses back to the same config
    again = parse_args(["--config", str(run.run_dir / "config.toml")], FinetuneConfig())
    assert again == run.task.cfg
    shutil.move(hf, tmp_path / "moved")
    with pytest.raises(CheckpointError, match="base model .* is gone"):
        load_run(run.run_dir)


def test_adapter_run_dir_loads_where_generate_loads_it(tmp_path):
    from cybertron.finetune.lora import lora_modules

    hf = make_hf_dir(tmp_path / "hf", "qwen2")
    chats = write_chats(tmp_path / "chats.jsonl", n=8)
    args = ["--model", str(hf), "--data", str(chats), "--steps", "1", "--out", str(tmp_path / "run"),
            "--seq-len", "96", "--log.tensorboard", "false", "--log.progress", "lines"]
    run = run_finetune(parse_args(args, FinetuneConfig(), SHORTCUTS))
    loaded = load_run(run.run_dir, head="lm")  # as `cybertron generate --model RUN_DIR` loads it
    model, tokenizer = loaded.model, loaded.tokenizer
    assert not list(lora_modules(model)) and tokenizer.chat_template is not None

"""A mistyped flag is answered with the closest flag the command accepts: its own shortcuts first
(`--methd` -> `--method`), then every `--section.key`; one `error:` line, exit 2, before any work."""

import pytest

from cybertron.cli import main as cli_main


@pytest.mark.parametrize("command, argv, suggestion", [
    ("finetune", ["--methd", "lora"], "--method"),
    ("align", ["--methd", "dpo"], "--method"),
    ("align", ["--wieghts", "lora"], "--weights"),
    ("train", ["--step", "5"], "--steps"),
    ("train", ["--learning_rate", "1e-3"], "--train.lr"),  # a name from another trainer, no shortcut
    ("finetune", ["--learning-rate", "1e-3"], "--lr"),  # ... which finetune has a shortcut for
    ("train", ["--resum"], "--resume"),
])
def test_mistyped_flag_suggests_the_commands_flag(command, argv, suggestion, tmp_path, capsys):
    code = cli_main([command, *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == f"error: unknown option {argv[0]!r}; did you mean {suggestion}?\n"
    assert not (tmp_path / "run").exists()


def test_flag_like_nothing_known_points_to_help(capsys):
    assert cli_main(["train", "--xyzzy", "1"]) == 2
    assert "unknown option '--xyzzy'" in capsys.readouterr().err


def test_section_keys_still_suggest_within_their_section(capsys):
    assert cli_main(["finetune", "--finetune.methd", "lora"]) == 2
    assert "did you mean finetune.method?" in capsys.readouterr().err


@pytest.mark.parametrize("command, extra", [("finetune", []), ("align", ["--method", "dpo"])])
@pytest.mark.parametrize("override, message", [
    ("--finetune.alpha=0", "finetune.alpha must be > 0"),  # an adapter scaled by 0 would change nothing
    ("--finetune.nf4_block_size=1", "finetune.nf4_block_size must be >= 2"),
    ("--model.dtype=float16", "model.dtype must be one of auto, fp32, bf16"),
])
def test_finetune_and_align_share_the_method_validator(command, extra, override, message, tmp_path, capsys):
    argv = [command, "--model", str(tmp_path), "--data", "d.jsonl", *extra, override, "--out", str(tmp_path / "run")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["finetune", "align"])
def test_base_dtype_accepts_the_torch_name(command):
    from cybertron.config import parse_args

    module = __import__(f"cybertron.commands.{command}", fromlist=["main"])
    config = module.AlignConfig() if command == "align" else module.FinetuneConfig()
    cfg = parse_args(["--model.dtype", "bfloat16", "--train.dtype=float32"], config, module.SHORTCUTS)
    assert (cfg.model.dtype, cfg.train.dtype) == ("bf16", "fp32")


def test_train_dtype_aliases_and_refusal():
    import torch

    from cybertron.config import TrainConfig, parse_args
    from cybertron.errors import ConfigError
    from cybertron.train.precision import resolve_dtype

    assert parse_args(["--train.dtype", "BFloat16"], TrainConfig()).train.dtype == "bf16"
    assert resolve_dtype("float32", torch.device("cpu")) == "fp32"
    assert resolve_dtype(parse_args(["--train.dtype=half"], TrainConfig()).train.dtype, torch.device("cpu")) == "fp16"
    with pytest.raises(ConfigError, match="train.dtype must be auto, fp32, bf16 or fp16"):
        resolve_dtype(parse_args(["--train.dtype=int8"], TrainConfig()).train.dtype, torch.device("cpu"))


@pytest.mark.parametrize("argv, new", [
    (["export", "--out", "RUN", "--to", "HF", "--merge"], "cybertron export --run RUN_DIR --out HF_DIR"),
    (["convert", "--out", "RUN", "--to", "HF"], "cybertron convert --run RUN_DIR --out HF_DIR"),
    (["generate", "--out", "RUN", "--prompt", "x"], "--model PATH (or --run RUN_DIR)"),
    (["serve", "--out", "RUN"], "--model PATH (or --run RUN_DIR)"),
])
def test_old_spellings_name_the_new_one(argv, new, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and new in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_command_lists_its_keys_and_shortcuts(capsys):
    for command, keys in [("generate", ["--sampling.top_p", "--prompt = --generate.prompt"]),
                          ("serve", ["--server.port", "--api-key = --server.api_key"]),
                          ("export", ["--export.dtype", "--merge = --export.merge"]),
                          ("convert", ["--convert.from_hf", "--run = --convert.run"]),
                          ("finetune", ["--finetune.alpha", "--resume = --run.resume"])]:
        assert cli_main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(key in out for key in keys), (command, out)

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

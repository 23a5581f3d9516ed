"""decode_escapes: what `--stop` and `align.stop` turn a typed backslash escape into."""

import pytest

from cybertron.data.escapes import decode_escapes
from cybertron.errors import ConfigError


@pytest.mark.parametrize("typed, meant", [
    ("\\n\\n", "\n\n"),
    ("a\\tb", "a\tb"),
    ("\\\\n", "\\n"),  # an escaped backslash stays a backslash
    ("\\x41\\u00e9", "Aé"),
    ("é 中\\n", "é 中\n"),  # characters outside latin-1 survive alongside an escape
    ("\\q", "\\q"),  # not an escape: kept as typed
    ("\n", "\n"),  # already a newline (TOML decoded it): unchanged
])
def test_escapes_are_decoded_like_python_string_literals(typed, meant):
    assert decode_escapes(typed, "--stop") == meant


def test_incomplete_escape_names_the_option():
    with pytest.raises(ConfigError, match='align.stop "\\\\x4" has an incomplete escape'):
        decode_escapes("\\x4", "align.stop")


def test_align_validation_rejects_an_incomplete_stop_escape():
    from cybertron.align.config import AlignConfig, validate

    cfg = AlignConfig()
    cfg.model.path, cfg.data.path, cfg.align.method, cfg.align.reward = "m", "d.jsonl", "grpo", "r.py:f"
    cfg.align.stop = "\\x4"
    with pytest.raises(ConfigError, match="align.stop"):
        validate(cfg)

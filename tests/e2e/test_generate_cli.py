"""`cybertron generate` as a user types it: `--stop "\n"` from a shell is a backslash and an `n`, decoded to
the newline it names (README's `--stop "\n\n"` must match)."""

import subprocess
import sys

import pytest

from cybertron.cli import main as cli_main
from cybertron.data.tokenizer import train_bpe_tokenizer
from tests.conftest import cli_env
from tests.scripted_model import write_scripted_run


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """After the prompt "x", greedy decoding writes "ab\\ncab\\ncab..." forever (single-byte tokens)."""
    tokenizer = train_bpe_tokenizer(["abc xyz\n" * 4], vocab_size=260)
    x, a, b, c, newline = (tokenizer.encode(ch)[0] for ch in "xabc\n")
    successor = {x: a, a: b, b: newline, newline: c, c: a}
    return write_scripted_run(tmp_path_factory.mktemp("run"), tokenizer, successor)


def test_without_stop_the_scripted_text_runs_past_newlines(scripted_run, capsys):
    argv = ["generate", "--model", str(scripted_run), "--prompt", "x", "--greedy", "--max-new-tokens", "8"]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == "ab\ncab\nc\n"  # 8 tokens, then the CLI's final newline


def test_stop_backslash_n_typed_in_a_shell_stops_at_the_newline(scripted_run):
    result = subprocess.run([sys.executable, "-m", "cybertron", "generate", "--model", str(scripted_run),
                             "--prompt", "x", "--greedy", "--max-new-tokens", "8", "--stop", "\\n"],
                            capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ab\n"


def test_an_incomplete_escape_is_one_line(scripted_run, capsys):
    argv = ["generate", "--model", str(scripted_run), "--prompt", "x", "--stop", "\\x4"]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == ('error: sampling.stop "\\x4" has an incomplete escape (truncated \\xXX '
                                       'escape); write a backslash itself as \\\\\n')

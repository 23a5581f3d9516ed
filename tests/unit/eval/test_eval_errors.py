"""`cybertron eval` mistakes end in one `error:` line and exit code 2, before any model is loaded where the
mistake can be seen without one: a missing model, nothing to evaluate, a missing or unreadable text file, an
HF directory without --out, an unknown task, a missing lm_eval extra."""

import subprocess
import sys

import pytest

from cybertron.cli import main as cli_main
from cybertron.commands.eval import normalize_argv
from tests.conftest import cli_env


def error_line(argv, capsys) -> str:
    assert cli_main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_model_may_come_first_and_perplexity_takes_several_files():
    assert normalize_argv(["M", "--perplexity", "a", "b", "--seq-len", "8"]) == \
        ["--model", "M", "--perplexity", "a", "--perplexity", "b", "--seq-len", "8"]
    assert normalize_argv(["--perplexity", "a", "b", "c", "--model", "M"]) == \
        ["--perplexity", "a", "--perplexity", "b", "--perplexity", "c", "--model", "M"]
    assert normalize_argv(["--run", "R", "--perplexity", "a"]) == ["--run", "R", "--perplexity", "a"]


def test_missing_model_is_one_line_with_exit_code_2(tmp_path):
    """The contract as a user meets it: a subprocess, one line, exit 2, no traceback."""
    (tmp_path / "x.txt").write_text("some text")
    result = subprocess.run([sys.executable, "-m", "cybertron", "eval", str(tmp_path / "nope"), "--perplexity",
                             str(tmp_path / "x.txt")], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --model {tmp_path / 'nope'} is not a directory; give a "
                                                  "run directory or a Hugging Face model directory"]


def test_mistakes_seen_before_loading(hf_dir, text_files, tmp_path, capsys):
    assert "--perplexity missing.txt is not a file" in error_line([str(hf_dir), "--perplexity", "missing.txt"], capsys)
    assert "nothing to evaluate" in error_line([str(hf_dir), "--out", str(tmp_path)], capsys)
    assert "give --out DIR" in error_line([str(hf_dir), "--perplexity", str(text_files[0])], capsys)
    assert "--stride 64 exceeds --seq-len 32" in error_line(
        [str(hf_dir), "--perplexity", str(text_files[0]), "--seq-len", "32", "--stride", "64", "--out",
         str(tmp_path)], capsys)
    assert "exceeds the model's context of 256" in error_line(
        [str(hf_dir), "--perplexity", str(text_files[0]), "--seq-len", "999", "--out", str(tmp_path)], capsys)
    (tmp_path / "taken.json").write_text("{}")
    assert "already exists" in error_line([str(hf_dir), "--perplexity", str(text_files[0]), "--out", str(tmp_path),
                                           "--name", "taken"], capsys)


def test_unreadable_text_is_one_line(hf_dir, tmp_path, capsys):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00not text")
    assert "is not UTF-8" in error_line([str(hf_dir), "--perplexity", str(binary), "--out", str(tmp_path)], capsys)
    assert not list(tmp_path.glob("*.json"))  # no results file for a failed evaluation


def test_unknown_task_and_missing_extra(hf_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: my_task\ndataset_path: json\noutput_type: loglikelihood\n")
    line = error_line([str(hf_dir), "--tasks", "my_tsak", "--include-path", str(tasks),
                       "--eval.builtin_tasks=false", "--out", str(tmp_path)], capsys)
    assert line == "error: unknown lm_eval task 'my_tsak'; did you mean my_task?"
    (tasks / "mine.yaml").write_text(f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {tmp_path / 'gone.jsonl'}\ntest_split: test\n"
                                     "output_type: loglikelihood\ndoc_to_text: x\ndoc_to_target: y\n")
    assert "lm_eval could not load the data of my_task (FileNotFoundError" in error_line(
        [str(hf_dir), "--tasks", "my_task", "--include-path", str(tasks), "--eval.builtin_tasks=false", "--out",
         str(tmp_path)], capsys)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # what an install without the [eval] extra sees
    assert "pip install 'cybertron[eval]'" in error_line([str(hf_dir), "--tasks", "x", "--out", str(tmp_path)],
                                                         capsys)

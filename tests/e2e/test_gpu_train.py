"""The same command on CUDA: device picked automatically, bf16 autocast, MFU reported where the peak is known."""

import subprocess
import sys

import pytest

from tests.conftest import cli_env, read_metrics


@pytest.mark.gpu
def test_train_runs_unchanged_on_cuda(tmp_path, fast_run_args):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "cybertron", *fast_run_args, "--steps", "5", "--out",
                             str(run_dir)], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "on cuda" in result.stdout
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(r["mem_gib"] > 0 for r in records)

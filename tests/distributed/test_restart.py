"""`--max-restarts`: a rank killed mid-run is restarted by torchrun's elastic agent, the restarted ranks resume
from the newest checkpoint, and the run ends with the losses of a run nobody killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.chaos import losses as _losses  # tolerant of lines torn by the kill
from bench.chaos import rank_pid as _rank_pid  # the worker torchrun started for a rank, found in /proc
from tests.conftest import cli_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 12
KILL_AFTER_STEP = 3  # one step past the checkpoint of step 2: the restart must repeat step 3


@pytest.fixture(scope="module")
def args(small_corpus, data_cache) -> list[str]:
    return ["train", "--nproc", "2", "--data.path", str(small_corpus), "--data.cache_dir", str(data_cache),
            "--data.vocab_size", "512", "--data.seq_len", "64", "--model.preset", "debug",
            "--train.global_batch_size", "8", "--train.micro_batch_size", "2", "--train.warmup_steps", "2",
            "--eval.every", "0", "--log.every", "1", "--log.progress", "lines", "--log.tensorboard", "false",
            "--checkpoint.every", "2", "--steps", str(STEPS)]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_restarts_and_the_losses_equal_an_uninterrupted_run(args, tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "cybertron", *args, "--out", str(reference)],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "cybertron", *args, "--out", str(out), "--max-restarts", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").is_file() and max(_losses(out), default=0) >= KILL_AFTER_STEP):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.02)
        victim = _rank_pid(launcher.pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]
    assert "restart 1: resuming from" in stdout, stdout[-3000:]  # the kill landed mid-run
    got, expected = _losses(out), _losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-6, (got, expected)

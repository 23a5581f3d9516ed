"""`cybertron train --resume` over damaged checkpoints and a full disk, as a user meets them (issue 13)."""

import subprocess
import sys

import pytest

from cybertron.train.checkpoint import checkpoint_problem
from tests.conftest import cli_env, read_metrics

# `python -m cybertron ARGS` with RLIMIT_FSIZE set: a write past LIMIT bytes fails with EFBIG (SIGXFSZ ignored),
# mid-file, through the same write calls as ENOSPC on a full disk, without root or a tiny filesystem.
LIMITED = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]; "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), hard)); "
           "sys.argv = ['cybertron', *sys.argv[2:]]; runpy.run_module('cybertron', run_name='__main__')")


def _cli(args, limit=None):
    prefix = ["-m", "cybertron"] if limit is None else ["-c", LIMITED, str(limit)]
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, env=cli_env(),
                          timeout=300)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow  # three CLI runs; tests/unit/train/test_checkpoint_verify.py covers the same cases fast
def test_flipped_bytes_fall_back_and_a_full_disk_is_one_line(tmp_path, fast_run_args):
    run_dir = tmp_path / "run"
    args = [*fast_run_args, "--steps", "4", "--checkpoint.every", "2", "--eval.every", "0", "--out", str(run_dir)]
    first = _cli(args)
    assert first.returncode == 0, first.stderr
    expected = _losses(run_dir)
    ckpts = run_dir / "checkpoints"
    shard = ckpts / "step-4" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    fallback = (f"warning: checkpoint {ckpts / 'step-4'} is corrupted (__0_0.distcp: content differs from the "
                "manifest (sha256)); falling back to step-2")

    # The disk "fills" during the save at step 4: one line, exit 2, step-2 untouched and nothing half-written.
    full = _cli([*args, "--resume"], limit=shard.stat().st_size // 2)
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert lines[0] == fallback
    assert len(lines) == 2 and lines[1].startswith(f"error: cannot write checkpoint {ckpts / 'step-4'} ("), lines
    assert "File too large" in lines[1] and "free on that disk" in lines[1]
    assert "the previous checkpoint step-2 is untouched: free space, then rerun with --resume" in lines[1]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4"]
    assert checkpoint_problem(ckpts / "step-2") is None

    # Space freed: --resume falls back again and repeats the uninterrupted run exactly.
    resumed = _cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [line for line in resumed.stderr.splitlines() if line.strip()] == [fallback]
    assert f"resumed from {ckpts / 'step-2'} at step 2" in resumed.stdout
    assert _losses(run_dir) == expected
    assert checkpoint_problem(ckpts / "step-4") is None  # the damaged one was replaced once the new one was whole

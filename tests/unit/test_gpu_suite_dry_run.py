"""bench/gpu_suite.py: each step's dry run (the GPU suite's code paths at tiny shapes on CPU) writes a JSON line
per figure with every required field, and a command past its limit costs that command only.

Each step's dry run starts real bench processes (torch, transformers and cybertron imports each); the decode
step, one process, stays in the default run, the others are slow."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = load_suite()


def dry_run(step: str, tmp_path: Path) -> list[dict]:
    """Run one step of the dry run; its figures, after checking that every command succeeded."""
    assert suite.main(["--dry-run", "--only", step, "--out", str(tmp_path)]) == 0, \
        next(tmp_path.glob("*.log")).read_text()[-3000:]
    summary = json.loads(next(tmp_path.glob("*.summary.json")).read_text())
    assert summary and all(o["status"] == "ok" and o["step"] == step for o in summary), summary
    files = list(tmp_path.glob("*.jsonl"))
    if step == "tests":
        assert files == []  # the tests write no figures
        return []
    assert [f.name for f in files] == [suite.results_path(tmp_path, "cpu").name]
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def assert_complete(rows: list[dict], bench: str, training: bool = False) -> None:
    from results_jsonl import REQUIRED  # on sys.path once gpu_suite is loaded

    assert rows
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, (missing, row)
        assert row["bench"] == bench and row["device"] == "cpu" and row["torch"]
        assert row["command"].startswith("python ") and f"bench/{bench}.py" in row["command"]
        numbers = ["tokens_per_s", "peak_mem_gib", *(["mfu"] if training else [])]
        for key in numbers:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_dry_run_decode_writes_every_field(tmp_path):
    rows = dry_run("decode", tmp_path)
    assert_complete(rows, "decode")
    for batch in (1, 2):  # batch 1 and the dry run's 2 concurrent requests, ours and the peer's
        runners = {r["runner"].split("-")[0] for r in rows if r["batch"] == batch}
        assert runners == {"cybertron", "transformers"}, (batch, rows)


@pytest.mark.slow  # five bench processes
def test_dry_run_train_writes_every_field_with_mfu(tmp_path):
    rows = dry_run("train", tmp_path)
    assert_complete(rows, "train_throughput", training=True)
    assert [r["runner"] for r in rows] == ["cybertron", "transformers", "cybertron+fusedloss",
                                          "cybertron+fp8-tensorwise"]
    for r in rows:  # MFU is tokens/s x FLOPs per token / the stated peak
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"])


@pytest.mark.slow  # a parent and two worker processes
def test_dry_run_finetune_writes_every_field(tmp_path):
    rows = dry_run("finetune", tmp_path)
    assert_complete(rows, "finetune")
    assert {r["runner"] for r in rows} == {"cybertron", "transformers+peft"}


@pytest.mark.slow
def test_dry_run_dpo_writes_every_field(tmp_path):
    rows = dry_run("dpo", tmp_path)
    assert_complete(rows, "dpo")
    expected = {"cybertron", "trl"} if importlib.util.find_spec("trl") else {"cybertron"}
    assert {r["runner"] for r in rows} == expected


@pytest.mark.slow  # collects the whole test tree
def test_dry_run_collects_the_gpu_tests(tmp_path):
    dry_run("tests", tmp_path)
    assert "test_gpu_decode.py" in next(tmp_path.glob("*.log")).read_text()


def test_a_command_past_its_limit_is_killed_with_its_children_and_the_next_still_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('sta' + 'rted', flush=True); time.sleep(60)")
    commands = [suite.Command("hang", [sys.executable, "-c", hang], 2.0),
                suite.Command("quick", [sys.executable, "-c", "print('quick' + ' ran')"], 30.0)]
    log = tmp_path / "suite.log"
    start = time.perf_counter()
    outcomes = suite.run_step("demo", commands, 60.0, log, dict(os.environ), min_s=1.0)
    assert [o.status for o in outcomes] == ["timeout", "ok"]
    assert time.perf_counter() - start < 30
    text = log.read_text()
    assert "started" in text and "quick ran" in text
    child = int(pid_file.read_text())
    for _ in range(50):  # killed with its group: gone, or a zombie until init reaps it
        try:
            if "State:\tZ" in Path(f"/proc/{child}/status").read_text():
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out command's child {child} still runs")


def test_a_step_starts_nothing_once_its_budget_is_spent(tmp_path):
    commands = [suite.Command("hang", [sys.executable, "-c", "import time; time.sleep(60)"], 60.0),
                suite.Command("never", [sys.executable, "-c", "print('should not run')"], 60.0)]
    outcomes = suite.run_step("demo", commands, 1.5, tmp_path / "suite.log", dict(os.environ), min_s=1.0)
    assert [o.status for o in outcomes] == ["timeout", "skipped (no budget left)"]
    assert "should not run" not in (tmp_path / "suite.log").read_text()


def test_seconds_a_step_leaves_unused_go_to_the_next(tmp_path):
    quick = suite.Command("quick", [sys.executable, "-c", "pass"], 30.0)
    sleep = suite.Command("sleep", [sys.executable, "-c", "import time; time.sleep(2)"], 30.0)
    # The second step's own 1 s would time the sleep out; the 20 s the first step did not use let it finish.
    outcomes = suite.run_steps([("a", [quick], 21.0), ("b", [sleep], 1.0)], tmp_path / "suite.log",
                               dict(os.environ))
    assert [o.status for o in outcomes] == ["ok", "ok"]

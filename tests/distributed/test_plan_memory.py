"""`cybertron plan`'s memory model against the peak memory measured per rank (bench/plan_vs_memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.distributed


@pytest.mark.slow  # three layouts in fresh gloo worlds; bench/RESULTS.md has the full table
def test_predicted_peak_memory_within_10_percent_of_measured():
    layouts = ["single", "fsdp2", "tp2+ac"]
    result = subprocess.run([sys.executable, str(REPO / "bench" / "plan_vs_memory.py"), "--only", ",".join(layouts),
                             "--check"], capture_output=True, text=True, env=cli_env(), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert [row.split("|")[1].strip() for row in rows] == layouts
    for row in rows:
        off = float(row.split("|")[-2].strip().rstrip("%"))
        assert abs(off) <= 10, row

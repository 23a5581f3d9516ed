"""Machine-readable benchmark figures: one JSON line per measured figure, appended by a bench's --json-out.

bench/gpu_suite.py points every bench at one file, bench/results/<date>-<device>.jsonl; a bench run by hand
can append to any file. Each line carries the fields in REQUIRED (plus whatever the bench adds: batch, seq,
how the noise is bounded, ...), so lines from different days and machines can be compared without the
console output they came with."""

from __future__ import annotations

import datetime
import json
import re
import resource
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

# Fields every line has; `tokens_per_s` and `peak_mem_gib` are numbers (training lines also carry `mfu`).
REQUIRED = ("date", "device", "torch", "bench", "runner", "shape", "tokens_per_s", "peak_mem_gib", "command")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


def results_path(folder: str | Path, device: torch.device | str) -> Path:
    """<folder>/<UTC date>-<device name as a file name>.jsonl, e.g. 2026-12-02-NVIDIA-H200.jsonl."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_name(device)).strip("-")
    return Path(folder) / f"{today()}-{slug}.jsonl"


def process_peak_gib() -> float:
    """This process's peak resident set so far (KiB on Linux): the CPU stand-in for CUDA's max allocated."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def this_command() -> str:
    """The command line that produced the figures, as it could be typed again."""
    return shlex.join(["python", *sys.argv])


def append_rows(path: str | Path, bench: str, device: torch.device | str, rows: list[dict[str, Any]]) -> None:
    """Append each row with the common fields filled in; a row's own fields win (e.g. its `command`)."""
    common = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": device_name(device), "torch": torch.__version__, "bench": bench,
              "command": this_command()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            line = {**common, **row}
            missing = [k for k in REQUIRED if k not in line]
            assert not missing, f"{bench} row lacks {missing}"
            f.write(json.dumps(line) + "\n")

"""The results file of `cybertron eval`: one JSON document per evaluation (model, what was evaluated, the
metrics and the config that produced them), written whole or not at all."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cybertron.errors import UserError
from cybertron.files import write_text_atomic

EVAL_DIR = "eval"  # RUN_DIR/eval/<name>.json for a cybertron run


def default_name() -> str:
    """A UTC timestamp: results files sort by when they were made."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def results_file(out_dir: Path, name: str) -> Path:
    """out_dir/name.json, refused if it already exists (an earlier evaluation is never overwritten)."""
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--name {name!r} must be a plain file name (no '/', not starting with '.')")
    path = Path(out_dir) / f"{name}.json"
    if path.exists():
        raise UserError(f"{path} already exists; choose another --name")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory for the results")
    return path


def write_results(path: Path, record: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # lm_eval's results may hold numpy scalars: anything JSON does not know is written as its text.
    write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
    return path

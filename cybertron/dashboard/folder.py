"""The runs in a folder and a one-line summary of each: method, status, newest step, last loss, tokens/s.

A run directory is what `cybertron train/finetune/align` write (README, "What `cybertron train` shows and leaves
behind"): config.toml, run.json, metrics.jsonl, checkpoints/step-N/. The folder's subdirectories holding any of
those are its runs (the folder itself too, when it is one run). A run is looked up by name among the listed
ones, never by joining a name from a request onto a path, so no request reaches a file outside the folder.

run.json is read here as plain JSON, for display only: runs.py owns the format (and loads runs), but it imports
torch, which this package avoids (see __init__). tests/unit/dashboard checks this reading against files that
runs.py writes.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cybertron.dashboard.tail import METRICS_FILE, read_last
from cybertron.errors import UserError

RUN_MARKERS = ("run.json", "finetune.json", "config.toml", METRICS_FILE)  # any of these: a run directory
CHECKPOINTS = "checkpoints"
# A run whose files changed this recently is running (a step, an evaluation or a save in progress rarely leaves
# the files untouched this long), or within 3 of its intervals between logged steps when those are longer.
RUNNING_WINDOW_S = 120.0
QUIET_INTERVALS = 3
KIND_NAMES = {"pretrain": "pretrain", "finetune": "sft", "reward": "reward"}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*")


class RunNotFound(LookupError):
    """No run of that name in the folder (the app answers 404)."""


class BadRunName(ValueError):
    """A name that can never be a run's (a path, `..`): the app answers 400."""


@dataclass
class RunSummary:
    name: str
    method: str  # pretrain, sft, dpo, grpo, ... with the adapter method: "dpo (lora)"
    status: str  # running, finished, failed, stopped (killed or crashed: the files do not say which)
    step: int | None  # the newest logged step
    total_steps: int | None  # train.steps from config.toml; None when it follows from train.epochs
    loss: float | None
    val_loss: float | None
    tokens_per_s: float | None
    checkpoints: int
    updated: float  # newest modification time of the run's files (seconds since the epoch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunsFolder:
    """The run directories under `root`."""

    def __init__(self, root: Path):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"RUNS_DIR {root} is not a directory; give the folder that holds your run directories "
                            "(e.g. runs/)")
        self.root = root.resolve()

    def runs(self) -> dict[str, Path]:
        """name -> directory, for every run in the folder."""
        found = {p.name: p for p in sorted(self.root.iterdir()) if p.is_dir() and is_run_dir(p)}
        if not found and is_run_dir(self.root):
            found[self.root.name] = self.root
        return found

    def find(self, name: str) -> Path:
        if not NAME.fullmatch(name) or name in (".", ".."):
            raise BadRunName(f"{name!r} is not a run name (a plain directory name, no path)")
        path = self.runs().get(name)
        if path is None:
            raise RunNotFound(f"no run named {name!r} in {self.root}")
        return path

    def summaries(self, now: float | None = None) -> list[RunSummary]:
        """Every run, most recently updated first."""
        now = time.time() if now is None else now
        found = [summarize(name, path, now) for name, path in self.runs().items()]
        return sorted(found, key=lambda s: -s.updated)


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS) or (path / CHECKPOINTS).is_dir()


def summarize(name: str, run_dir: Path, now: float) -> RunSummary:
    records = read_last(run_dir / METRICS_FILE)
    total = total_steps(run_dir)
    steps = checkpoint_steps(run_dir)
    updated = last_modified(run_dir)
    last = records[-1] if records else {}
    window = max(RUNNING_WINDOW_S, QUIET_INTERVALS * log_interval_s(records))
    return RunSummary(
        name=name, method=describe_method(run_dir), status=run_status(last, total, steps, now - updated, window),
        step=last.get("step"), total_steps=total,
        loss=_newest(records, "loss"), val_loss=_newest(records, "val_loss"),
        tokens_per_s=_newest(records, "tokens_per_s"), checkpoints=len(steps), updated=updated)


def run_status(last: dict[str, Any], total: int | None, checkpoint_steps: list[int], age_s: float,
               window_s: float = RUNNING_WINDOW_S) -> str:
    """finished: the final checkpoint exists (train.steps known), or, when the length follows from epochs, the
    run went quiet right after an evaluation at its newest checkpoint's step (a run ends by evaluating, then
    saving). running: its files changed within `window_s`. failed: it went quiet on a skipped step (the
    divergence guard stops a run there, train.max_skipped_steps). stopped: quiet otherwise (killed or crashed)."""
    if total and total in checkpoint_steps:
        return "finished"
    if age_s < window_s:
        return "running"
    if "skipped" in last:
        return "failed"
    if not total and checkpoint_steps and "val_loss" in last and last.get("step") == checkpoint_steps[-1]:
        return "finished"
    return "stopped"


def log_interval_s(records: list[dict[str, Any]]) -> float:
    """Seconds between the last two logged training steps, from their cumulative `tokens` and the last
    `tokens_per_s` (measured over that interval); 0 when the records do not say (no `tokens` field)."""
    logged = [r for r in records if isinstance(r.get("tokens"), (int, float)) and "loss" in r]
    if len(logged) < 2 or not isinstance(logged[-1].get("tokens_per_s"), (int, float)) \
            or logged[-1]["tokens_per_s"] <= 0:
        return 0.0
    return max(0.0, (logged[-1]["tokens"] - logged[-2]["tokens"]) / logged[-1]["tokens_per_s"])


def describe_method(run_dir: Path) -> str:
    """pretrain, sft, reward or the alignment method, with the adapters that trained: "dpo (lora)"."""
    meta = _read_json(run_dir / "run.json")
    if meta is not None:
        adapters = meta.get("adapters")
        kind = KIND_NAMES.get(meta.get("kind"), str(meta.get("kind", "?")))
        weights = adapters.get("method", "?") if isinstance(adapters, dict) else "full"
        method = meta.get("align_method") or kind
        return method if method == "pretrain" and weights == "full" else f"{method} ({weights})"
    legacy = _read_json(run_dir / "finetune.json")  # before run.json: fine-tuning and alignment runs
    if legacy is not None:
        return f"{legacy.get('align_method') or 'sft'} ({legacy.get('method', '?')})"
    return "pretrain"  # runs written before any metadata file were pretraining runs


def total_steps(run_dir: Path) -> int | None:
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    steps = config.get("train", {}).get("steps")
    return steps if isinstance(steps, int) and steps > 0 else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the published checkpoints (step-N/; a save in progress is .tmp-step-N/), ascending."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


def last_modified(run_dir: Path) -> float:
    paths = [run_dir, run_dir / CHECKPOINTS, *(run_dir / m for m in RUN_MARKERS)]
    times = []
    for p in paths:
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def _newest(records: list[dict[str, Any]], key: str) -> float | None:
    return next((r[key] for r in reversed(records) if isinstance(r.get(key), (int, float))), None)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

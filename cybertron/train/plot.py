"""Training curves from run directories' metrics.jsonl: one panel per metric against the step, runs overlaid.

matplotlib is an optional extra (`cybertron[plot]`). The figure is a plain matplotlib Figure drawn by the Agg
canvas, never pyplot: nothing process-wide (pyplot's backend, its current figure) is touched, so a notebook or
GUI that imports this keeps its own backend."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cybertron.errors import UserError

METRICS = ("loss", "val_loss", "lr", "tokens_per_s", "grad_norm")
TITLES = {"loss": "training loss", "val_loss": "validation loss", "lr": "learning rate", "tokens_per_s": "tokens/s",
          "grad_norm": "gradient norm (before clipping)"}
PANEL_INCHES = (6.0, 3.6)  # width, height of one panel
DPI = 100
COLUMNS = 2


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records (a line torn by a kill is left out); UserError when `run_dir` is not a run
    directory or has logged nothing yet."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give run directories (what `cybertron train --out` wrote)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: not a cybertron run directory, or a run that has not "
                        "logged a step yet")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no metrics yet")
    return records


def series(records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry `metric` as a number (null, e.g. MFU on a CPU, is skipped)."""
    points = [(r["step"], float(r[metric])) for r in records
              if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(runs: dict[str, list[dict[str, Any]]], metrics: list[str]) -> Any:
    """A matplotlib Figure: one panel per metric, each run one line in the same colour in every panel, and one
    legend naming the runs. A metric a run did not log (no validation set) is left out of that run's panel."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as err:
        raise UserError("cybertron plot needs matplotlib: pip install 'cybertron[plot]'") from err
    if not any(series(records, m)[0] for records in runs.values() for m in metrics):
        raise UserError(f"none of {', '.join(metrics)} is logged in {', '.join(runs)}")
    cols = min(COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics):
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        drawn = False
        for i, (name, records) in enumerate(runs.items()):
            steps, values = series(records, metric)
            if steps:
                marker = "o" if len(steps) < 20 else None  # a few evaluations read better as points
                ax.plot(steps, values, color=f"C{i % 10}", label=name, marker=marker, markersize=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=ax.transAxes)
    handles = [Line2D([], [], color=f"C{i % 10}", label=name) for i, name in enumerate(runs)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4))
    return fig


def save_plot(fig: Any, out: Path) -> Path:
    """Write the figure as a PNG at `out` (a directory: metrics.png inside it)."""
    if out.is_dir():
        out = out / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out

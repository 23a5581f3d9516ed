"""`cybertron plot`: training curves of one or more runs as a PNG.

    cybertron plot RUN [RUN ...] [--out FILE.png] [--metrics loss,val_loss,lr,tokens_per_s,grad_norm]

One panel per metric against the step (from each run's metrics.jsonl), the runs overlaid in the same colour
in every panel, with a legend naming them. A metric a run did not log (no validation set) is left out of its
panels. Needs matplotlib: pip install 'cybertron[plot]'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import help_text, opt, parse_args
from cybertron.errors import ConfigError
from cybertron.train.plot import METRICS, plot_runs, read_metrics, save_plot


@dataclass
class PlotSection:
    runs: list[str] = opt([], "run directories to overlay (plain arguments work too: cybertron plot RUN RUN)")
    out: str = opt("metrics.png", "the PNG written (a directory: metrics.png inside it)")
    metrics: list[str] = opt(list(METRICS), "metrics of metrics.jsonl to plot, one panel each, comma-separated")


@dataclass
class PlotConfig:
    plot: PlotSection = field(default_factory=PlotSection)


SHORTCUTS = {"--run": "plot.runs", "--out": "plot.out", "--metrics": "plot.metrics"}


def split_runs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Plain arguments are run directories; every option of this command takes a value (`--out X` or
    `--out=X`), so the word after an option without `=` is its value, not a run."""
    runs, options = [], []
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            takes_next = "=" not in argv[i] and i + 1 < len(argv)
            options += argv[i:i + 1 + takes_next]
            i += 1 + takes_next
        else:
            runs.append(argv[i])
            i += 1
    return runs, options


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + help_text(PlotConfig(), "plot", SHORTCUTS))
        return 0
    runs, options = split_runs(argv)
    p = parse_args(options, PlotConfig(), SHORTCUTS).plot
    runs += p.runs
    metrics = list(dict.fromkeys(m.strip() for item in p.metrics for m in item.split(",") if m.strip()))
    if not runs:
        raise ConfigError("give at least one run directory: `cybertron plot RUN [RUN ...] [--out FILE.png]`")
    if not metrics:
        raise ConfigError(f"--metrics is empty; e.g. --metrics {','.join(METRICS)}")
    out = Path(p.out)
    if not out.is_dir() and out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: give a .png file (or a directory, for metrics.png inside it)")
    records = {run: read_metrics(Path(run)) for run in dict.fromkeys(runs)}
    out = save_plot(plot_runs(records, metrics), out)
    print(f"wrote {out}: {', '.join(metrics)} of {len(records)} run(s)")
    return 0

"""`cybertron plot` (commands/plot.py, train/plot.py): the PNG decodes at the expected size, and the lines drawn
are the runs' metrics.jsonl values, written by the MetricsLogger every training command logs through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cybertron.commands.plot import main as plot_main
from cybertron.commands.plot import split_runs
from cybertron.errors import UserError
from cybertron.train.metrics import MetricsLogger
from cybertron.train.plot import METRICS, plot_runs, read_metrics


def _run(run_dir: Path, steps: int, scale: float, evaluate: bool) -> Path:
    run_dir.mkdir(parents=True)
    logger = MetricsLogger(run_dir, None)
    for step in range(0, steps + 1):
        if step:
            logger.log({"step": step, "loss": scale * 4 / step, "lr": 1e-3 * scale, "grad_norm": 1 / step,
                        "tokens_per_s": 1000.0 + step, "mfu": None, "mem_gib": 0.5, "tokens": 64 * step})
        if evaluate and step % 5 == 0:
            logger.log({"step": step, "val_loss": scale * 5 / (step + 1), "val_ppl": 1.0})
    logger.close()
    return run_dir


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    return _run(tmp_path / "a", 12, 1.0, True), _run(tmp_path / "b", 8, 2.0, False)  # b: no validation set


def test_lines_are_the_runs_metrics(runs):
    a, b = runs
    records = {str(a): read_metrics(a), str(b): read_metrics(b)}
    fig = plot_runs(records, list(METRICS))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["training loss", "validation loss", "learning rate", "tokens/s",
                                                 "gradient norm (before clipping)"]
    for ax, metric in zip(panels, METRICS):
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        for run in (a, b):
            expected = [(r["step"], r[metric]) for r in records[str(run)] if metric in r]
            if expected:
                assert drawn.pop(str(run)) == ([s for s, _ in expected], [v for _, v in expected])
        assert drawn == {}  # nothing else: run b has no val_loss line
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [str(a), str(b)]


def test_the_command_writes_a_png_of_the_expected_size(runs, tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "curves.png"
    assert plot_main([str(runs[0]), "--out", str(out), str(runs[1]), "--metrics", "loss,val_loss,lr"]) == 0
    assert capsys.readouterr().out == f"wrote {out}: loss, val_loss, lr of 2 run(s)\n"
    pixels = imread(out)
    assert pixels.shape == (2 * 360, 2 * 600, 4)  # two rows of two 6 x 3.6 in panels at 100 dpi
    assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank page
    assert plot_main([str(runs[1]), "--out", str(tmp_path), "--metrics", "loss"]) == 0  # a directory
    assert imread(tmp_path / "metrics.png").shape == (360, 600, 4)  # metrics.png inside it, one panel


def test_plain_arguments_are_runs_and_option_values_are_not():
    assert split_runs(["r1", "--out", "x.png", "r2", "--metrics=loss", "r3"]) == (
        ["r1", "r2", "r3"], ["--out", "x.png", "--metrics=loss"])


def test_bad_input_is_named(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"step": 1, "lo')
    cases = [([str(tmp_path / "nope")], "is not a directory"),
             ([str(empty)], "has no metrics.jsonl: not a cybertron run directory"),
             ([str(tmp_path / "torn")], "holds no metrics yet"),
             ([str(runs[1]), "--metrics", "val_loss"], f"none of val_loss is logged in {runs[1]}"),
             ([str(runs[0]), "--out", str(tmp_path / "x.jpg")], "give a .png file"),
             (["--out", "x.png"], "give at least one run directory")]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            plot_main(argv)


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cybertron", "plot", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {tmp_path} has no metrics.jsonl: not a cybertron run directory, or a run "
                           "that has not logged a step yet\n")

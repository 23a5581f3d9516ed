"""A pretraining run on a [[data.mix]] of two sources, interrupted after a checkpoint and resumed, trains on
exactly the batches of an uninterrupted run (in-process; the subprocess kill is tests/e2e/test_train_cli.py's)."""

import json
import shutil

from cybertron.config import TRAINING_SHORTCUTS, TrainConfig, parse_args
from cybertron.pretrain import run_training
from tests.conftest import read_metrics


def _config(tmp_path, out, resume=False):
    docs_a = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]
    docs_b = [f"The {i}th line of prose, with words in it." for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs_a))
    (tmp_path / "b.txt").mkdir(exist_ok=True)
    for i, d in enumerate(docs_b):
        (tmp_path / "b.txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "run.toml").write_text(
        f'[data]\nvocab_size = 300\nseq_len = 16\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[[data.mix]]\npath = "{tmp_path / "a.jsonl"}"\nweight = 3\n'
        f'[[data.mix]]\npath = "{tmp_path / "b.txt"}"\nweight = 1\n')
    args = ["--config", str(tmp_path / "run.toml"), "--model.preset", "debug", "--train.global_batch_size", "4",
            "--steps", "4", "--checkpoint.every", "2", "--eval.every", "0", "--eval.batches", "1",
            "--eval.batch_size", "2", "--log.every", "1", "--log.progress", "lines", "--log.tensorboard", "false",
            "--checkpoint.async_save", "false", "--out", str(out)]
    return parse_args(args + (["--resume"] if resume else []), TrainConfig(), TRAINING_SHORTCUTS)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_mixture_resume_sees_the_uninterrupted_batches(tmp_path):
    full = tmp_path / "full"
    run_training(_config(tmp_path, full), lambda run_dir: None)
    # What a kill right after the step-2 checkpoint leaves: that checkpoint and the metrics up to step 2.
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "step-4")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2))
    run_training(_config(tmp_path, killed, resume=True), lambda run_dir: None)
    expected, got = _losses(full), _losses(killed)
    assert sorted(got) == list(range(1, 5))
    assert got == expected  # bitwise: float equality of every step's loss

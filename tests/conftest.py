"""Shared fixtures: a small local corpus and the flags of a fast training run."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

# Tests run side by side on 2 cores: one thread each avoids oversubscription (ARCHITECTURE.md pitfall 1).
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def gpu_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not gpu_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A .jsonl corpus of ~60 stdlib modules (about 1 MB): real code, small enough for seconds-long runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p for p in stdlib.glob("*.py"))[:60]
    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    with path.open("w") as f:
        for p in names:
            f.write(json.dumps({"text": p.read_text(encoding="utf-8", errors="ignore")}) + "\n")
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def fast_run_args(small_corpus, data_cache):
    """Flags for a `cybertron train` run that takes a few seconds on one core."""
    return ["--data.path", str(small_corpus), "--data.cache_dir", str(data_cache), "--data.vocab_size", "512",
            "--data.seq_len", "64", "--model.preset", "debug", "--train.global_batch_size", "8",
            "--train.warmup_steps", "2", "--eval.batches", "2", "--eval.batch_size", "4",
            "--log.every", "1", "--log.progress", "lines", "--log.tensorboard", "false"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env

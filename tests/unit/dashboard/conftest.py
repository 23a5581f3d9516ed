"""Run directories written by cybertron's own writers (runs.py's run.json, the session's config.toml,
train/metrics.py's MetricsLogger) and a real `cybertron serve` app over a tiny random model, for the dashboard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cybertron.config import TrainConfig
from cybertron.data.tokenizer import TextTokenizer, train_bpe_tokenizer
from cybertron.finetune.lora import LoRASpec
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.runs import Adapters, RunMeta
from cybertron.train.metrics import MetricsLogger
from cybertron.train.session import write_config

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 4, "Hello world! A tiny corpus for a tiny tokenizer. " * 3,
          "def add(a, b):\n    return a + b\n" * 4]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def train_record(step: int, loss: float) -> dict:
    """A training step's record, with the keys MetricsLogger receives from the session."""
    return {"step": step, "loss": loss, "lr": 3e-3, "grad_norm": 1.5, "tokens_per_s": 1000.0 + step, "mfu": None,
            "mem_gib": 0.4, "tokens": 128 * step}


def make_run(root: Path, name: str, losses: list[float], total_steps: int, meta: RunMeta | None = None,
             checkpoints: tuple[int, ...] = (), extra: tuple[dict, ...] = (), age_s: float = 0.0) -> Path:
    """A run directory as `cybertron train` leaves it: config.toml, run.json, metrics.jsonl (a step-0
    evaluation, one record per loss, `extra` records), checkpoints/step-N/; files dated `age_s` seconds ago."""
    run_dir = root / name
    cfg = TrainConfig()
    cfg.train.steps = total_steps
    write_config(run_dir, cfg)
    (meta or RunMeta("pretrain")).write(run_dir)
    logger = MetricsLogger(run_dir, None)
    logger.log({"step": 0, "val_loss": losses[0] + 0.1, "val_ppl": 300.0})
    for step, loss in enumerate(losses, 1):
        logger.log(train_record(step, loss))
    for record in extra:
        logger.log(record)
    for step in checkpoints:
        (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)
    if age_s:
        old = os.path.getmtime(run_dir) - age_s
        for p in [run_dir, *run_dir.rglob("*")]:
            os.utime(p, (old, old))
    return run_dir


def lora_dpo_meta() -> RunMeta:
    return RunMeta("finetune", "/models/base", Adapters("lora", LoRASpec(rank=4)), align_method="dpo")


@pytest.fixture(scope="session")
def chat_tokenizer() -> TextTokenizer:
    bpe = train_bpe_tokenizer(CORPUS, vocab_size=320)
    return TextTokenizer(bpe.backend, eos_token=bpe.eos_token, chat_template=TEMPLATE)


@pytest.fixture(scope="session")
def serve_url(chat_tokenizer):
    """`cybertron serve`'s app (the engine loop in the background, as the command runs it) on a free local port."""
    from cybertron.dashboard.server import in_thread
    from cybertron.serve.async_engine import AsyncEngine
    from cybertron.serve.engine import Engine
    from cybertron.serve.server import create_app

    model = build_model(preset_config("debug", vocab_size=chat_tokenizer.vocab_size), seed=1).eval()
    engine = Engine(model, chat_tokenizer, max_batch_size=4, num_blocks=64, block_size=8)
    with in_thread(create_app(AsyncEngine(engine), chat_tokenizer, "tiny")) as url:
        yield url

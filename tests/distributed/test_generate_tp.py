"""`cybertron generate --tp 2`'s rank function on 2 gloo ranks (the ranks torchrun would start, without the
seconds of starting a world per prompt): for several prompts, greedy and seeded, rank 0 prints exactly what one
process prints, and rank 1 prints nothing."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cybertron.commands.generate import GenerateConfig, generate_rank
from cybertron.config import parse_args
from cybertron.parallel.dims import ParallelDims, build_mesh
from cybertron.parallel.runtime import DistEnv
from cybertron.parallel.world import World
from cybertron.runs import load_for_inference
from cybertron.serve.generate import generate_stream
from tests.e2e.test_serve import make_model_dir

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
CASES = [("The quick brown", ["--sampling.greedy=true"]), ("def add(a, b):", ["--sampling.greedy=true"]),
         ("Hello world! Servers", ["--sampling.temperature=0.9", "--sampling.seed=4", "--sampling.top_k=50"])]


def _config(model_dir: str, prompt: str, flags: list[str]) -> GenerateConfig:
    return parse_args(["--model.path", model_dir, "--model.device", "cpu", "--generate.prompt", prompt,
                       "--sampling.max_new_tokens", "20", "--parallel.tp", "2", *flags], GenerateConfig())


def _rank_run(rank: int, model_dir: str) -> dict:
    dims = ParallelDims.resolve(2, tp=2)
    world = World(DistEnv(rank, rank, 2), dims, build_mesh(dims, "cpu"), torch.device("cpu"))
    printed = []
    for prompt, flags in CASES:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            generate_rank(_config(model_dir, prompt, flags), world)
        printed.append(out.getvalue())
    result = {"printed": printed}
    if rank == 0:  # one process on the whole model, as `generate` without --tp prints it
        model, tokenizer, _ = load_for_inference(Path(model_dir), False, torch.device("cpu"))
        result["want"] = ["".join(generate_stream(model, tokenizer, p, _config(model_dir, p, f).sampling.params()))
                          + "\n" for p, f in CASES]
    return result


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # ARCHITECTURE.md pitfall 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        result = _rank_run(rank, model_dir)
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_generate_tp_prints_what_one_process_prints(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    make_model_dir(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(model_dir), str(tmp_path)), nprocs=2, join=True)
    leader, follower = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for result in (leader, follower):
        assert "error" not in result, result["error"]
    assert leader["printed"] == leader["want"]
    assert all(len(text) > 5 for text in leader["want"])
    assert follower["printed"] == ["", "", ""]

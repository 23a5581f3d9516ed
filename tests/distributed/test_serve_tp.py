"""Tensor-parallel serving on 2 gloo ranks (serve/mirror.py, serve/tensor_parallel.py): rank 0's LeaderEngine
takes requests, rank 1 mirrors it on its shard. Against one process on the whole model: the same greedy tokens
and seeded samples, also after a request is cancelled mid-way; and on every rank the same logits, bit for bit,
and the same step outputs."""

from __future__ import annotations

import hashlib
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
from torch.distributed.device_mesh import init_device_mesh

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.mirror import LeaderEngine, command_channel, follow
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.tensor_parallel import shard_model

pytestmark = pytest.mark.distributed
# dim 64, 4 heads / 2 kv heads; an odd vocabulary, as tokenizers often have, splits unevenly. The MoE preset
# (experts computed whole on every rank, attention split), a sliding-window model, a Gemma 2 shape (soft-capped
# scores on each rank's heads, alternating windows) and a LongRoPE model whose sequences outgrow the original
# context (each rank recomputes them in step) run in the slow suite.
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 12, "short_factor": [1.0 + 0.1 * i for i in
            range(8)], "long_factor": [2.0 + i for i in range(8)]}
VARIANTS = {"debug": ("debug", {}), "moe": ("moe", {}), "window": ("debug", {"sliding_window": 6}),
            "gemma2": ("debug", dict(mlp_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norms=True,
                                     embed_scale=True, attn_scalar=24.0, final_logit_softcap=2.0, attn_softcap=0.05,
                                     sliding_window=5, layer_types=["sliding_attention", "full_attention"])),
            "longrope": ("debug", dict(rope_scaling=LONGROPE, max_seq_len=64))}
VOCAB = 257
OPTIONS = dict(max_batch_size=2, num_blocks=24, block_size=8, decode_graphs=False)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 3)]


PARAMS = [SamplingParams(temperature=0.0, max_tokens=9, logprobs=True),
          SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=3, logprobs=True),
          SamplingParams(temperature=0.0, max_tokens=12, logprobs=True)]


class Recorded(Engine):
    """An engine that keeps what each step produced (request ids and tokens), to compare ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[list] = []

    def step(self):
        outputs = super().step()
        self.steps.append([[o.request_id, o.token_ids, o.finished] for o in outputs])
        return outputs


class RecordedLeader(LeaderEngine, Recorded):
    pass


def _logit_digests(model: torch.nn.Module) -> list[str]:
    digests: list[str] = []
    model.register_forward_hook(lambda _m, _a, out: digests.append(hashlib.sha1(out.numpy().tobytes()).hexdigest()))
    return digests


def _scenario(engine: Engine) -> dict:
    """Rank 0's work: a batch (more prompts than batch slots), then a request cancelled mid-stream beside
    another one (a prompt of the batch again: a prefix-cache hit), then, with the prefix cache reset, a new
    greedy request after the cancel."""
    batch = engine.generate(_prompts(), PARAMS)
    long_id = engine.add_request(_prompts()[1], SamplingParams(temperature=0.0, max_tokens=20))
    kept: list = []
    engine.add_request(_prompts()[0], PARAMS[1], on_output=kept.append)
    for _ in range(3):
        engine.step()
    engine.cancel(long_id)
    while not (kept and kept[-1].finished):
        engine.step()
    engine.reset_prefix_cache()
    after = engine.generate([_prompts()[2]], [SamplingParams(temperature=0.0, max_tokens=4, logprobs=True)])[0]
    return {"batch": [[r.token_ids, r.logprobs] for r in batch],
            "kept": [t for o in kept for t in o.token_ids], "after": [after.token_ids, after.logprobs]}


def _rank_run(rank: int, variant: str) -> dict:
    preset, overrides = VARIANTS[variant]
    MODEL = preset_config(preset, vocab_size=VOCAB, n_layers=2, **overrides)
    sharded = build_model(MODEL, seed=0)
    shard_model(sharded, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
    digests = _logit_digests(sharded)
    channel = command_channel()
    kv_heads = MODEL.n_kv_heads // 2
    if rank == 1:
        engine = Recorded(sharded, None, kv_heads=kv_heads, **OPTIONS)
        steps = follow(engine, channel)
        return {"steps": engine.steps, "followed": steps, "digests": digests}
    leader = RecordedLeader(sharded, None, channel=channel, kv_heads=kv_heads, **OPTIONS)
    got = _scenario(leader)
    leader.stop_followers()
    want = _scenario(Engine(build_model(MODEL, seed=0), None, **OPTIONS))  # one process, the whole model
    return {"got": got, "want": want, "steps": leader.steps, "digests": digests}


def _worker(rank: int, port: int, out_dir: str, preset: str) -> None:
    torch.set_num_threads(1)  # ARCHITECTURE.md pitfall 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        result = _rank_run(rank, preset)
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=["debug", *(pytest.param(v, marks=pytest.mark.slow)
                                                   for v in ("moe", "window", "gemma2", "longrope"))])
def ranks(request, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("serve_tp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out), request.param), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert "error" not in r, r["error"]
    return results


def test_tp_engine_samples_what_one_process_samples(ranks):
    got, want = ranks[0]["got"], ranks[0]["want"]
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got["batch"], want["batch"]):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) <= 1e-4
    assert [len(t) for t, _ in got["batch"]] == [9, 6, 12]
    assert got["kept"] == want["kept"] and len(got["kept"]) == 6  # its neighbour was cancelled mid-way
    assert got["after"][0] == want["after"][0]  # and the ranks are still in step afterwards


def test_every_rank_has_the_same_logits_and_outputs_each_step(ranks):
    leader, follower = ranks
    assert follower["followed"] == len(leader["steps"]) > 10
    assert follower["steps"] == leader["steps"]
    assert follower["digests"] == leader["digests"] and len(leader["digests"]) > 10

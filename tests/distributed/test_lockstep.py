"""Generation from FSDP2-sharded weights (ZeRO-3) with uneven work per rank: each rank's engine runs its own
requests in lockstep with the other's (parallel/lockstep.py) and samples exactly what an engine on the whole,
unsharded model samples for the same requests; afterwards the sharded model still trains (its gathered
buffers were not made in inference mode)."""

from __future__ import annotations

import json
import os
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
from cybertron.parallel.data_parallel import apply_fsdp
from cybertron.parallel.lockstep import ShardedLockstep
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams

pytestmark = pytest.mark.distributed
MODEL = preset_config("debug", vocab_size=256)  # dim 64, 4 layers
PORT = 29655

# (prompt length, max_tokens) per request, per round, per rank. Round 0: rank 0 has nothing to do at all.
# Round 1: rank 1 has more requests than batch slots (one waits and is prefilled mid-way) and longer ones.
WORK = [
    {0: [], 1: [(5, 4), (9, 2)]},
    {0: [(3, 2)], 1: [(5, 7), (9, 3), (2, 11)]},
]


def _requests(rank: int, round_: int) -> tuple[list[list[int]], list[SamplingParams]]:
    g = torch.Generator().manual_seed(100 * round_ + rank)
    prompts, params = [], []
    for i, (length, max_tokens) in enumerate(WORK[round_][rank]):
        prompts.append(torch.randint(0, MODEL.vocab_size, (length,), generator=g).tolist())
        params.append(SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=1000 * round_ + 10 * rank + i,
                                     logprobs=True))
    return prompts, params


def _engine(model: torch.nn.Module, lockstep: ShardedLockstep | None = None) -> Engine:
    return Engine(model, None, max_batch_size=2, num_blocks=16, block_size=8, decode_graphs=False,
                  lockstep=lockstep)


def _counted(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _loss(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(12)[None] % MODEL.vocab_size
    return torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])


def _rank_run(rank: int) -> dict:
    whole = build_model(MODEL, seed=0)  # the reference: one process, no sharding, no lockstep
    sharded = build_model(MODEL, seed=0)
    lockstep = ShardedLockstep(sharded, dist.group.WORLD, torch.device("cpu"))
    engine, reference = _engine(sharded, lockstep), _engine(whole)
    apply_fsdp(sharded, init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",)), reshard_after_forward=True)
    sharded_calls, whole_calls = _counted(sharded), _counted(whole)
    rounds = []
    for round_ in range(len(WORK)):
        prompts, params = _requests(rank, round_)
        before = (sharded_calls[0], whole_calls[0], lockstep.idle_forwards)
        got, want = engine.generate(prompts, params), reference.generate(prompts, params)
        rounds.append({"tokens": [r.token_ids for r in got], "want_tokens": [r.token_ids for r in want],
                       "logprob_gap": max((abs(a - b) for r, w in zip(got, want)
                                           for a, b in zip(r.logprobs, w.logprobs)), default=0.0),
                       "calls": sharded_calls[0] - before[0], "own_calls": whole_calls[0] - before[1],
                       "idle": lockstep.idle_forwards - before[2]})
    sharded.train(), whole.train()
    _loss(sharded).backward()
    _loss(whole).backward()
    grad = sharded.layers["1"].mlp.up_proj.weight.grad.full_tensor()
    return {"rounds": rounds, "grad_gap": float((grad - whole.layers["1"].mlp.up_proj.weight.grad).abs().max())}


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # ARCHITECTURE.md pitfall 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        result = _rank_run(rank)
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("lockstep")
    mp.spawn(_worker, args=(str(out),), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert "error" not in r, r["error"]
    return results


def test_each_rank_samples_what_the_whole_model_samples(ranks):
    for result in ranks:
        for round_ in result["rounds"]:
            assert round_["tokens"] == round_["want_tokens"]
            assert round_["logprob_gap"] <= 1e-5
    assert [len(t) for t in ranks[1]["rounds"][1]["tokens"]] == [7, 3, 11]  # the work really was uneven


def test_ranks_call_the_model_equally_often_the_idler_one_idle(ranks):
    for i in range(len(WORK)):
        r0, r1 = ranks[0]["rounds"][i], ranks[1]["rounds"][i]
        busiest = max(r0["own_calls"], r1["own_calls"])
        assert r0["calls"] == r1["calls"] == busiest  # every call of one rank met one of the other
        for r in (r0, r1):
            assert r["idle"] == busiest - r["own_calls"]
        assert r0["idle"] > 0 and r1["idle"] == 0
    assert ranks[0]["rounds"][0]["own_calls"] == 0  # a rank with no requests at all still joins every call


def test_the_sharded_model_trains_after_generating(ranks):
    for result in ranks:
        assert result["grad_gap"] <= 1e-6

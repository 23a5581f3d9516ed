"""Expert-parallel dispatch and combine on 2 gloo ranks against one process: each rank routes its own tokens
(uneven counts, an expert nobody picks, a rank that sends nothing to the other), the rank holding an expert
applies it, and the outputs and the gradients of tokens and expert weights equal those of one process that
holds every expert and every rank's tokens."""

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

from cybertron.parallel.expert_parallel import combine, dispatch

# The default suite runs expert parallelism end to end (test_expert_parallel.py, ep 2) and the reorder alone
# (tests/unit/test_expert_parallel.py); this spawn adds the edge cases with exact gradients.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PORT = 29671
EP, E, DIM = 2, 4, 3
# Expert of each token, per rank: rank 0 sends nothing to rank 1's experts (2, 3); expert 1 gets no token.
EXPERT_IDS = {0: [0, 0, 0, 0, 0], 1: [3, 0, 2, 2, 3, 3, 0]}


def _problem() -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """Every rank's tokens and output gradients, and every expert's weight (E, DIM, DIM), from fixed seeds."""
    g = torch.Generator().manual_seed(0)
    tokens = {r: torch.randn(len(ids), DIM, generator=g) for r, ids in EXPERT_IDS.items()}
    out_grads = {r: torch.randn(len(ids), DIM, generator=g) for r, ids in EXPERT_IDS.items()}
    return tokens, out_grads, torch.randn(E, DIM, DIM, generator=g)


def _sort(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(EXPERT_IDS[rank])
    return torch.argsort(ids, stable=True), torch.bincount(ids, minlength=E)


def _apply_experts(x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.cat([chunk @ w for chunk, w in zip(x.split(counts.tolist()), weights)])


def reference() -> dict:
    """One process: every rank's tokens through every expert, gradients summed over all tokens."""
    tokens, out_grads, weights = _problem()
    weights.requires_grad_()
    result = {"out": {}, "x_grad": {}}
    for rank in EXPERT_IDS:
        order, counts = _sort(rank)
        x = tokens[rank].clone().requires_grad_()
        y_sorted = _apply_experts(x[order], counts, weights)
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        (y * out_grads[rank]).sum().backward()
        result["out"][rank], result["x_grad"][rank] = y.detach(), x.grad
    result["w_grad"] = weights.grad
    return result


def _rank_run(rank: int) -> dict:
    tokens, out_grads, weights = _problem()
    e = E // EP
    local_w = weights[rank * e:(rank + 1) * e].clone().requires_grad_()  # this rank's experts only
    order, counts = _sort(rank)
    x = tokens[rank].clone().requires_grad_()
    x_local, local_counts, plan = dispatch(x[order], counts, dist.group.WORLD)
    y_sorted = combine(_apply_experts(x_local, local_counts, local_w), plan, dist.group.WORLD)
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
    (y * out_grads[rank]).sum().backward()
    return {"out": y.tolist(), "x_grad": x.grad.tolist(), "w_grad": local_w.grad.tolist(),
            "local_counts": local_counts.tolist()}


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # ARCHITECTURE.md pitfall 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    dist.init_process_group("gloo", rank=rank, world_size=EP, timeout=timedelta(seconds=60))
    try:
        result = _rank_run(rank)
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("expert_dispatch")
    mp.spawn(_worker, args=(str(out),), nprocs=EP, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(EP)]
    for r in results:
        assert "error" not in r, r["error"]
    return results


def test_dispatch_and_combine_match_one_process(ranks):
    want = reference()
    e = E // EP
    assert ranks[0]["local_counts"] == [7, 0] and ranks[1]["local_counts"] == [2, 3]  # who received what
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(torch.tensor(result["out"]), want["out"][rank], rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(result["x_grad"]), want["x_grad"][rank], rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(result["w_grad"]), want["w_grad"][rank * e:(rank + 1) * e],
                                   rtol=0, atol=1e-6)

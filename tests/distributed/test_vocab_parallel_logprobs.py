"""sharded_next_token_logprobs on 2 gloo ranks against the plain computation on whole logits: the same
per-token log-probabilities and the same gradient of a weighted sum of them (each rank's vocabulary shard)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

B, T, V = 5, 7, 12  # 5 rows: the chunks of 2 rows leave a short last one


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T - 1, generator=g)  # a loss that weighs every position differently
    return logits, ids, weights


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cybertron.parallel.tensor_parallel import loss_parallel_context, sharded_next_token_logprobs

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    logits, ids, weights = _inputs()
    mesh = init_device_mesh("cpu", (2,))
    sharded = distribute_tensor(logits, mesh, [Shard(2)]).detach().requires_grad_(True)
    with loss_parallel_context():
        logp = sharded_next_token_logprobs(sharded, ids, chunk_rows=2)
        (logp * weights).sum().backward()
    grad = sharded.grad.full_tensor()  # a collective: every rank joins
    if rank == 0:
        Path(out_dir, "out.json").write_text(json.dumps({
            "plain_tensor": type(logp) is torch.Tensor,
            "logp": logp.detach().tolist(),
            "grad": grad.tolist()}))
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_next_token_logprobs_match_the_plain_computation(tmp_path):
    from cybertron.train.losses import next_token_logprobs

    mp.spawn(_worker, args=(29651, str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / "out.json").read_text())
    logits, ids, weights = _inputs()
    logits.requires_grad_(True)
    expected = next_token_logprobs(logits, ids)
    (expected * weights).sum().backward()
    assert got["plain_tensor"]  # what the preference losses multiply by their masks
    torch.testing.assert_close(torch.tensor(got["logp"]), expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["grad"]), logits.grad, rtol=0, atol=1e-6)
    # and against the definition, not only the other implementation
    direct = torch.log_softmax(logits.detach()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(got["logp"]), direct, rtol=0, atol=1e-5)

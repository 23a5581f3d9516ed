"""Expert bytes per rank under expert parallelism (gloo, CPU), one torch.distributed world for all degrees.

    python bench/moe_ep.py [--world 4] [--steps 4]

For ep in 1, 2, 4 (.. up to the world size) at FSDP2 (zero3, dp_shard = world), per rank:
- at rest: the bytes of this rank's shards of the experts' weights (what stays between steps);
- gathered: the bytes of expert weights one MoE layer's forward holds whole on this rank. Without expert
  parallelism FSDP2 gathers all n_experts of a layer on every rank; with it, a rank gathers only its
  n_experts / ep experts (over the efsdp = world / ep ranks), so this falls as 1 / ep;
- routed tokens: rows this rank sends to other ranks per step in the dispatch all-to-all (combine sends as
  many back, and backward repeats both);
- step time (median of steps 2..N, fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cybertron.models.presets import preset_config  # noqa: E402

MODEL = preset_config("tiny", dim=128, n_heads=4, n_kv_heads=4, ffn_dim=512, vocab_size=1024, n_layers=4,
                      tie_embeddings=False, n_experts=8, top_k=2, moe_ffn_dim=256)
SEQ, GLOBAL_BATCH, MICRO = 64, 16, 2


def _local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def measure(ep: int, world: int, steps: int) -> dict:
    import torch.distributed as dist

    from cybertron.config import ParallelSection, TrainSection
    from cybertron.models.llama import build_model
    from cybertron.models.moe import GroupedExperts
    from cybertron.parallel.apply import build_parallel_optimizer, parallelize
    from cybertron.parallel.dims import ParallelDims, build_mesh, dp_mesh
    from cybertron.train.schedule import lr_at
    from cybertron.train.trainer import Trainer

    pcfg = replace(ParallelSection(), ep=ep)
    dims = ParallelDims.resolve(world, ep=ep)
    dims.validate_model(MODEL)
    mesh = build_mesh(dims, "cpu")
    t = TrainSection(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO)
    par = parallelize(build_model(MODEL, seed=0), dims, mesh, pcfg)
    experts = [m for m in par.model.modules() if isinstance(m, GroupedExperts)]
    at_rest = sum(_local_bytes(p) for m in experts for p in m.parameters())
    gathered: list[int] = []
    sent = [0]
    ep_rank = mesh["ep"].get_local_rank() if ep > 1 else 0

    def observe(module, args) -> None:  # after FSDP2's own pre-forward hook: the weights are gathered by now
        gathered.append(sum(_local_bytes(p) for p in module.parameters(recurse=False)))
        rows = args[1].view(ep, -1).sum(1)  # tokens this rank routes to each expert-parallel rank's experts
        sent[0] += int(rows.sum() - rows[ep_rank])

    for m in experts:
        m.register_forward_pre_hook(observe)
    trainer = Trainer(par.model, build_parallel_optimizer(par, dims, mesh, t), par.step_fn,
                      lambda s: lr_at(s, t.lr, 2, steps, 0.1), 1.0, collectives=par.collectives)
    gen = torch.Generator().manual_seed(dp_mesh(mesh).get_local_rank())
    local = GLOBAL_BATCH // dims.dp
    times = []
    for step in range(steps):
        tokens = torch.randint(0, MODEL.vocab_size, (local, SEQ + 1), generator=gen)
        mbs = [{"inputs": x[:, :-1], "labels": x[:, 1:]} for x in tokens.split(MICRO)]
        sent[0] = 0
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(step, mbs).loss.item()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return {"at_rest": at_rest, "gathered_per_layer": max(gathered), "sent_rows": sent[0],
            "ms": statistics.median(times[1:]) * 1000}


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # ARCHITECTURE.md pitfall 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    degrees = [ep for ep in (1, 2, 4, 8) if ep <= world and world % ep == 0 and MODEL.n_experts % ep == 0]
    results = {ep: measure(ep, world, steps) for ep in degrees}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--world", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ep.json"
        mp.spawn(_worker, args=(args.world, 29751, args.steps, str(out)), nprocs=args.world, join=True)
        ranks = json.loads(out.read_text())
    per_layer = 3 * MODEL.n_experts * MODEL.dim * MODEL.expert_ffn_dim * 4
    print(f"model {MODEL.num_params() / 1e6:.2f}M params ({MODEL.n_experts} experts x {MODEL.n_layers} MoE "
          f"layers, {per_layer / 2**20:.2f} MiB of expert weights per layer), global batch {GLOBAL_BATCH} x {SEQ} "
          f"tokens, micro-batch {MICRO}, fp32 zero3, torch {torch.__version__}, gloo, world size {args.world}\n")
    print("| ep | efsdp | expert bytes at rest / rank | gathered per MoE layer / rank | x of ep 1 | "
          "rows sent to other ranks / step (max rank) | ms / step |")
    print("|---|---|---|---|---|---|---|")
    base = ranks[0]["1"]["gathered_per_layer"]
    for ep in ranks[0]:
        r0 = ranks[0][ep]
        assert all(r[ep]["gathered_per_layer"] == r0["gathered_per_layer"] for r in ranks)
        sent = max(r[ep]["sent_rows"] for r in ranks)
        print(f"| {ep} | {args.world // int(ep)} | {r0['at_rest'] / 2**20:.3f} MiB | "
              f"{r0['gathered_per_layer'] / 2**20:.3f} MiB | {r0['gathered_per_layer'] / base:.3f} | {sent} | "
              f"{max(r[ep]['ms'] for r in ranks):.0f} |")


if __name__ == "__main__":
    main()

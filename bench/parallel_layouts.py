"""CPU step time of each parallel layout at world size 4 (gloo), one torch.distributed world for all.

    python bench/parallel_layouts.py [--steps 6]

Model: the tiny preset with 8 layers, vocabulary 1024, untied head (~6.8M parameters); global batch
16 x 128 tokens, micro-batches of 4 sequences per rank; fp32. Reports the median of steps 2..N.
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

# The shape is spelled out (not just "tiny") so the figures stay comparable when the preset changes, and
# so tp 4 divides its 8 heads and 4 kv heads.
MODEL = preset_config("tiny", dim=256, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=1024, n_layers=8,
                      tie_embeddings=False)
SEQ, GLOBAL_BATCH, MICRO = 128, 16, 4
PP2 = {"pp": 2, "pp_microbatches": 2}
LAYOUTS = {
    "ddp": {"data_parallel": "ddp"},
    "zero1": {"data_parallel": "zero1"},
    "zero2": {"data_parallel": "zero2"},
    "zero3": {"data_parallel": "zero3"},
    "zero3 + cpu offload": {"cpu_offload": True},
    "zero3 + full AC": {"activation_checkpoint": "full"},
    "zero3 + selective AC": {"activation_checkpoint": "selective"},
    "hsdp 2x2": {"dp_replicate": 2, "dp_shard": 2},
    "tp 4 (sp, loss parallel)": {"tp": 4},
    "fsdp 2 x tp 2": {"tp": 2},
    "pp 4 gpipe": {"pp": 4, "pp_schedule": "gpipe"},
    "pp 4 1f1b": {"pp": 4, "pp_schedule": "1f1b"},
    "pp 4 interleaved_1f1b v2": {"pp": 4, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2,
                                 "pp_microbatches": 4},
    "pp 4 interleaved_zb v2": {"pp": 4, "pp_schedule": "interleaved_zb", "pp_virtual_stages": 2,
                               "pp_microbatches": 4},
    "pp 2 x fsdp 2 (1f1b)": {**PP2, "pp_schedule": "1f1b"},
    "pp 2 x tp 2 (1f1b)": {**PP2, "tp": 2, "pp_schedule": "1f1b"},
}


def time_layout(overrides: dict, world: int, steps: int) -> float:
    import torch.distributed as dist

    from cybertron.config import ParallelSection, TrainSection
    from cybertron.models.llama import build_model
    from cybertron.parallel.apply import build_parallel_optimizer, parallelize
    from cybertron.parallel.dims import ParallelDims, build_mesh, dp_mesh
    from cybertron.train.schedule import lr_at
    from cybertron.train.trainer import Trainer

    pcfg = replace(ParallelSection(), **overrides)
    dims = ParallelDims.resolve(world, pcfg.dp_replicate, pcfg.dp_shard, pcfg.tp, pcfg.pp, pcfg.data_parallel)
    mesh = build_mesh(dims, "cpu")
    t = TrainSection(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO)
    par = parallelize(build_model(MODEL, seed=0), dims, mesh, pcfg)
    trainer = Trainer(par.model, build_parallel_optimizer(par, dims, mesh, t),
                      par.step_fn, lambda s: lr_at(s, t.lr, 2, steps, 0.1), 1.0,
                      collectives=par.collectives, strategy=par.strategy)
    gen = torch.Generator().manual_seed(dp_mesh(mesh).get_local_rank())
    local = GLOBAL_BATCH // dims.dp
    times = []
    for step in range(steps):
        tokens = torch.randint(0, MODEL.vocab_size, (local, SEQ + 1), generator=gen)
        mbs = [{"inputs": x[:, :-1], "labels": x[:, 1:]} for x in tokens.split(MICRO)]
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(step, mbs).loss.item()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    results = {name: time_layout(overrides, world, steps) for name, overrides in LAYOUTS.items()}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--world", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        mp.spawn(_worker, args=(args.world, 29741, args.steps, str(out)), nprocs=args.world, join=True)
        results = json.loads(out.read_text())
    print(f"model {MODEL.num_params() / 1e6:.2f}M params, global batch {GLOBAL_BATCH} x {SEQ} tokens, micro-batch "
          f"{MICRO}, fp32, torch {torch.__version__}, gloo, world size {args.world}\n")
    print("| layout | ms / step | tokens / s |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds * 1000:.0f} | {GLOBAL_BATCH * SEQ / seconds:,.0f} |")


if __name__ == "__main__":
    main()

"""`cybertron plan`'s memory model against the peak memory measured per rank on CPU (gloo), layout by layout.

    python bench/plan_vs_memory.py                   # every layout, the table for bench/RESULTS.md
    python bench/plan_vs_memory.py --only single,tp2 --check

Each layout runs in fresh processes (torch.multiprocessing, gloo): every rank builds the model, lays it out
with the real `build_trainer` (parallelize + the layout's optimizer, fp32 AdamW), runs one warm-up step
(AdamW's state exists after it), then resets the kernel's peak-RSS mark (/proc/self/clear_refs "5") and runs
a second step. The measured peak is VmHWM during that step minus the RSS before the model existed (after the
process group and a first collective), on the rank with the largest peak. A fixed glibc mmap threshold sends
every tensor above 128 KiB to its own mapping, returned to the OS when freed, so RSS follows live tensors
(as bench/memory.py's activation table does). The prediction is `cybertron.plan.memory.estimate` for the
same model, layout, sequence length and micro-batch at fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cybertron.models.presets import preset_config  # noqa: E402

# Wide enough that the model's memory, not the process's fixed overheads, dominates (about 4M parameters,
# about 60 MiB of activations per rank at 4 x 256 tokens); small enough for 4 ranks on 2 cores.
MODEL = preset_config("tiny", vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768)
SEQ_LEN, MICRO_BATCH = 256, 4
# name: (world size, ParallelSection fields)
LAYOUTS: dict[str, tuple[int, dict]] = {
    "single": (1, {}),
    "ddp2": (2, {"data_parallel": "ddp"}),
    "fsdp2": (2, {"data_parallel": "zero3"}),
    "tp2": (2, {"tp": 2}),
    "fsdp2xtp2": (4, {"tp": 2}),
    "pp2": (2, {"pp": 2}),
    "cp2": (2, {"cp": 2}),
}
# The fixed per-process term on CPU (allocator, BLAS and gloo buffers made during the first step, the heap's
# retained small blocks), fitted with the three constants of cybertron/plan/memory.py over these layouts.
CPU_OVERHEAD = 12 * 2**20
_EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def all_layouts() -> dict[str, tuple[int, dict]]:
    out = {}
    for name, (world, fields) in LAYOUTS.items():
        out[name] = (world, fields)
        out[f"{name}+ac"] = (world, {**fields, "activation_checkpoint": "full"})
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(world, fields: dict) -> dict:
    import gc
    from dataclasses import replace

    # cybertron imports these at first use (the pipeline schedules, dynamo for the experts' compiler.disable);
    # their code and tables are the process's, not the layout's, so they belong before the baseline
    import torch._dynamo  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401

    from cybertron.config import ParallelSection, TrainSection
    from cybertron.models.llama import build_model
    from cybertron.parallel.build_trainer import build_trainer

    gc.collect()
    before = _rss()
    model = build_model(MODEL, seed=0)
    pcfg = replace(ParallelSection(), **fields)
    trainer, _ = build_trainer(model, world, pcfg, TrainSection(), "fp32", lambda step: 1e-3)
    del model
    gen = torch.Generator().manual_seed(world.dp_rank if world.is_distributed else 0)

    def batch():
        tokens = torch.randint(0, MODEL.vocab_size, (MICRO_BATCH, SEQ_LEN + 1), generator=gen)
        return [{"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}]

    trainer.train_step(1, batch())
    gc.collect()
    if world.is_distributed:
        world.barrier()
    phases = {}
    step = trainer.optimizer.step

    def step_marking_phase(*args, **kwargs):  # the forward/backward's peak, then the optimizer step's
        phases["fwd_bwd"] = _hwm() - before
        _reset_hwm()
        return step(*args, **kwargs)

    trainer.optimizer.step = step_marking_phase
    _reset_hwm()
    steady = _rss() - before  # parameters + optimizer state (+ anything kept between steps)
    trainer.train_step(2, batch())
    phases["optimizer"] = _hwm() - before
    return {"peak": max(phases.values()), "steady": steady, **phases}


def _worker(rank: int, world_size: int, port: int, fields: dict, out: str) -> None:
    from cybertron.config import ParallelSection
    from cybertron.parallel.runtime import DistEnv
    from cybertron.parallel.world import run_on_world

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    p = ParallelSection(**fields) if fields else ParallelSection()
    from cybertron.parallel.dims import ParallelDims

    dims = ParallelDims.resolve(world_size, p.dp_replicate, p.dp_shard, p.tp, p.pp, p.data_parallel, cp=p.cp)

    def body(world):
        if world.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(torch.ones(1))  # gloo's first-collective buffers belong to the baseline
        result = _measure(world, fields)
        if world.is_distributed:
            import torch.distributed as dist

            gathered = [None] * world_size
            dist.all_gather_object(gathered, result)
            result = gathered
        else:
            result = [result]
        if rank == 0:
            Path(out).write_text(json.dumps(result))

    run_on_world(DistEnv(rank, rank, world_size), dims, "cpu", 300, body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_layout(world_size: int, fields: dict) -> dict:
    """Run one layout in fresh processes; the rank with the largest peak."""
    import torch.multiprocessing as mp

    os.environ.update(_EXACT_MALLOC, OMP_NUM_THREADS="1")  # read by glibc when the workers start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.json"
        mp.spawn(_worker, args=(world_size, _free_port(), fields, str(out)), nprocs=world_size, join=True)
        per_rank = json.loads(out.read_text())
    return max(per_rank, key=lambda r: r["peak"])


def predict(world_size: int, fields: dict):
    from cybertron.plan.layouts import Layout
    from cybertron.plan.memory import estimate

    layout = Layout.from_fields(world_size, fields, micro_batch=MICRO_BATCH)
    return estimate(MODEL, layout, SEQ_LEN, dtype="fp32", optimizer="adamw", overhead=CPU_OVERHEAD)


def compare(names: list[str]) -> list[dict]:
    layouts = all_layouts()
    rows = []
    for name in names:
        world, fields = layouts[name]
        measured = measure_layout(world, fields)
        mem = predict(world, fields)
        rows.append({"layout": name, "world": world, "measured": measured["peak"], "steady": measured["steady"],
                     "predicted": mem.total, "breakdown": mem.as_dict()})
        row = rows[-1]
        print(f"  {name}: measured {row['measured'] / 2**20:.1f} MiB, predicted {row['predicted'] / 2**20:.1f} MiB "
              f"({row['predicted'] / row['measured'] - 1:+.1%})", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated layout names (default: all)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every prediction is within 10%%")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(all_layouts())
    unknown = set(names) - set(all_layouts())
    if unknown:
        sys.exit(f"unknown layouts {sorted(unknown)}; choose from {', '.join(all_layouts())}")
    rows = compare(names)
    mib = 2**20
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, gloo on CPU; model "
          f"{MODEL.num_params() / 1e6:.2f}M params (dim {MODEL.dim}, {MODEL.n_layers} layers, ffn {MODEL.ffn_dim}, "
          f"vocab {MODEL.vocab_size}), seq {SEQ_LEN}, micro-batch {MICRO_BATCH}, fp32 AdamW")
    print("\n| layout | ranks | params | grads | optim | activations | transient | overhead | predicted MiB "
          "| measured MiB | off by |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["breakdown"]
        cols = [b[k] / mib for k in ("params", "grads", "optim", "activations", "transient", "overhead")]
        off = r["predicted"] / r["measured"] - 1
        print(f"| {r['layout']} | {r['world']} | " + " | ".join(f"{c:.1f}" for c in cols)
              + f" | {r['predicted'] / mib:.1f} | {r['measured'] / mib:.1f} | {off:+.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.check and any(abs(r["predicted"] / r["measured"] - 1) > 0.10 for r in rows):
        sys.exit("a prediction differs from the measured peak by more than 10%")


if __name__ == "__main__":
    main()

"""Per-rank memory of parameters + gradients + optimizer state for DDP and ZeRO-1/2/3 at world size 4
(fp32 AdamW), beside the ZeRO paper's per-parameter theory; and the activation memory saved by
activation checkpointing (none / full / selective) in one process; and the state each rank keeps between
steps for QLoRA under DDP and ZeRO-3, and full fine-tuning with tensor parallelism 2 (x ZeRO-3 2).

    python bench/memory.py                 # the ZeRO and activation tables
    python bench/memory.py --world 4 --only zero
    python bench/memory.py --world 4 --only finetune

Definitions (what the ZeRO paper counts, per rank, divided by the model's parameter count):
- params: bytes of the parameters the modules compute with, at their largest: after the forward pass
  (DDP, ZeRO-1 and ZeRO-2 replicate them; ZeRO-3 frees them block by block);
- grads: bytes of gradients after backward (DDP: its buckets; ZeRO-2: the gradients of the parameters
  the rank's optimizer partition owns, the others were reduced to their owners and dropped; ZeRO-3: the
  reduce-scattered shards);
- optim: AdamW's exp_avg and exp_avg_sq after the step (ZeRO-1/2: the rank's partition).
ZeRO-1/2 partition whole tensors (ZeroRedundancyOptimizer), so the largest rank holds a little more than
1/N of the gradients and optimizer state. Activation memory: peak RSS during one forward+backward above
the RSS before it, in a fresh process per mode with a fixed glibc mmap threshold (large blocks go back to
the OS when freed, so RSS follows live tensors), minus the gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cybertron.models.presets import preset_config  # noqa: E402

# Many similar-sized tensors (8 layers, a small vocabulary): ZeRO-1 partitions whole tensors, so a few
# huge ones (a 128k-token embedding) would make its partitions uneven.
MODEL = preset_config("tiny", vocab_size=1024, n_layers=8, tie_embeddings=False)  # ~3.5M params
THEORY = {  # bytes per parameter, fp32 Adam, N data-parallel ranks
    "ddp": lambda n: 16.0,
    "zero1": lambda n: 4 + 4 + 8 / n,
    "zero2": lambda n: 4 + 12 / n,
    "zero3": lambda n: 16 / n,
}


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _shard_bytes(tensors) -> int:
    # sharded DTensor parameters: their local pieces (storage may be padded by FSDP, count the elements)
    return sum(t.to_local().numel() * t.element_size() for t in tensors if hasattr(t, "to_local"))


def measure_rank(layout: str, world: int) -> dict:
    import torch.distributed as dist

    from cybertron.config import ParallelSection, TrainSection
    from cybertron.models.llama import build_model
    from cybertron.parallel.apply import build_parallel_optimizer, parallelize
    from cybertron.parallel.dims import ParallelDims, build_mesh
    from cybertron.train.losses import cross_entropy_sum

    dims = ParallelDims.resolve(world, data_parallel=layout)
    mesh = build_mesh(dims, "cpu")
    par = parallelize(build_model(MODEL, seed=0), dims, mesh, replace(ParallelSection(), data_parallel=layout))
    opt = build_parallel_optimizer(par, dims, mesh, TrainSection())
    n_params = MODEL.num_params()
    tokens = torch.randint(0, MODEL.vocab_size, (2, 65), generator=torch.Generator().manual_seed(dist.get_rank()))
    shards = _shard_bytes(par.model.parameters())  # FSDP's persistent fp32 shards (0 for DDP)
    loss = cross_entropy_sum(par.model(tokens[:, :-1]), tokens[:, 1:])
    # after forward: DDP / ZeRO-1 / ZeRO-2 hold plain replicated parameters, ZeRO-3 only its shards again
    plain = [p for p in par.model.parameters() if not hasattr(p, "to_local")]
    param_bytes = _storage_bytes(plain) if plain else shards
    loss.backward()
    grad_bytes = _storage_bytes([p.grad for p in par.model.parameters() if p.grad is not None])
    opt.step()
    local_opt = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer: the rank's partition
    state = [v for s in local_opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    optim_bytes = _storage_bytes(state)
    return {k: v / n_params for k, v in
            {"params": param_bytes, "grads": grad_bytes, "optim": optim_bytes}.items()}


def _worker(rank: int, world: int, port: int, layouts: list[str], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    results = {layout: measure_rank(layout, world) for layout in layouts}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def zero_table(world: int) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    layouts = list(THEORY)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.json"
        mp.spawn(_worker, args=(world, 29731, layouts, str(out)), nprocs=world, join=True)
        per_rank = json.loads(out.read_text())
    rows = []
    for layout in layouts:
        # report the largest rank (uneven shards differ by a few elements)
        worst = max((r[layout] for r in per_rank), key=lambda m: m["params"] + m["grads"] + m["optim"])
        total = worst["params"] + worst["grads"] + worst["optim"]
        rows.append({"layout": layout, **worst, "total": total, "theory": THEORY[layout](world)})
    return rows


FINETUNE = {  # name: (method, ParallelSection fields)
    "qlora ddp": ("qlora", {"data_parallel": "ddp"}),
    "qlora zero3": ("qlora", {"data_parallel": "zero3"}),
    "full tp2 x zero3": ("full", {"data_parallel": "zero3", "tp": 2}),
}


def _local_bytes(t: torch.Tensor) -> int:
    from cybertron.finetune.quant import nf4_storage_bytes

    local = t.to_local() if hasattr(t, "to_local") else t
    if hasattr(local, "quantized_data"):
        return nf4_storage_bytes(local)
    return local.numel() * local.element_size()


def measure_finetune_rank(name: str, world: int) -> dict:
    """Bytes this rank keeps between steps (after one forward, backward and AdamW step): the NF4 base, the
    other frozen weights (embedding, norms, head), the trained weights, their gradients and AdamW's state.
    ZeRO-3 also gathers one block's weights at a time during compute (transient, not counted)."""
    from cybertron.config import ParallelSection, TrainSection
    from cybertron.finetune.lora import LoRASpec, apply_lora
    from cybertron.finetune.quant import check_shardable, quantize_base_
    from cybertron.models.llama import build_model
    from cybertron.parallel.apply import build_parallel_optimizer, parallelize
    from cybertron.parallel.dims import ParallelDims, build_mesh, dp_mesh
    from cybertron.parallel.tensor_parallel import loss_parallel_context

    method, fields = FINETUNE[name]
    pcfg = replace(ParallelSection(), **fields)
    dims = ParallelDims.resolve(world, tp=pcfg.tp, data_parallel=pcfg.data_parallel)
    mesh = build_mesh(dims, "cpu")
    model = build_model(MODEL, seed=0)
    if method == "qlora":
        apply_lora(model, LoRASpec(rank=16, alpha=32.0), seed=0)
        quantize_base_(model)
        if pcfg.data_parallel == "zero3":
            check_shardable(model, world)
    # every rank built the same weights: no start-up broadcast (it alters NF4 bases, ARCHITECTURE.md pitfall 13)
    par = parallelize(model, dims, mesh, pcfg, replicas_equal=True)
    opt = build_parallel_optimizer(par, dims, mesh, TrainSection())
    seed = dp_mesh(mesh).get_local_rank()  # the ranks of one tensor-parallel group see the same tokens
    tokens = torch.randint(0, MODEL.vocab_size, (2, 65), generator=torch.Generator().manual_seed(seed))
    # vocabulary-sharded logits (tensor parallelism) need forward and backward inside loss_parallel()
    context = loss_parallel_context() if pcfg.tp > 1 and pcfg.loss_parallel else contextlib.nullcontext()
    with context:
        loss, _ = par.step_fn(par.model, {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]})
        loss.backward()
    opt.step()
    params = list(par.model.parameters())
    nf4 = [p for p in params if hasattr(p.to_local() if hasattr(p, "to_local") else p, "quantized_data")]
    state = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    return {
        "nf4 base": sum(_local_bytes(p) for p in nf4),
        "other frozen": sum(_local_bytes(p) for p in params if not p.requires_grad) - sum(map(_local_bytes, nf4)),
        "trained": sum(_local_bytes(p) for p in params if p.requires_grad),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optim": sum(map(_local_bytes, state)),
    }


def _finetune_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    results = {name: measure_finetune_rank(name, world) for name in FINETUNE}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def finetune_table(world: int) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.json"
        mp.spawn(_finetune_worker, args=(world, 29733, str(out)), nprocs=world, join=True)
        per_rank = json.loads(out.read_text())
    # the largest rank of each layout
    return [{"layout": name, **max((r[name] for r in per_rank), key=lambda m: sum(m.values()))}
            for name in FINETUNE]


def activation_child(mode: str) -> dict:
    """In a fresh process: peak RSS of one forward+backward above the RSS before it."""
    from cybertron.models.llama import build_model
    from cybertron.parallel.activation_checkpoint import apply_activation_checkpoint
    from cybertron.train.losses import cross_entropy_sum

    torch.set_num_threads(1)
    model = apply_activation_checkpoint(build_model(MODEL, seed=0), mode)
    tokens = torch.randint(0, MODEL.vocab_size, (8, 513), generator=torch.Generator().manual_seed(0))
    before = _rss_now()
    cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(p.grad.numel() * 4 for p in model.parameters())
    return {"mode": mode, "activation_bytes": peak - before - grads}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# A fixed mmap threshold: every tensor above 128 KiB gets its own mapping, returned to the OS when freed
# (glibc's default threshold grows after the first free and then keeps freed memory in the heap, which
# made the RSS peak depend on allocation history).
_EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def activation_table() -> list[dict]:
    rows = []
    for mode in ("none", "full", "selective"):
        out = subprocess.run([sys.executable, __file__, "--activation-child", mode], capture_output=True,
                             text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", **_EXACT_MALLOC})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["activation_bytes"]
    for row in rows:
        row["saving"] = 1 - row["activation_bytes"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--only", choices=["zero", "activations", "finetune"])
    parser.add_argument("--check", action="store_true", help="exit 1 unless every total is within 10%% of theory")
    parser.add_argument("--activation-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.activation_child:
        print(json.dumps(activation_child(args.activation_child)))
        return
    print(f"model: {MODEL.num_params() / 1e6:.2f}M parameters (tiny preset, untied), fp32 AdamW, torch "
          f"{torch.__version__}, gloo, world size {args.world}")
    if args.only == "finetune":
        print("\n| layout | NF4 base KiB | other frozen KiB | trained KiB | grads KiB | optim KiB | total KiB |")
        print("|---|---|---|---|---|---|---|")
        for r in finetune_table(args.world):
            cols = [r[k] / 1024 for k in ("nf4 base", "other frozen", "trained", "grads", "optim")]
            print(f"| {r['layout']} | " + " | ".join(f"{c:.1f}" for c in cols) + f" | {sum(cols):.1f} |")
        return
    if args.only != "activations":
        print("\n| layout | params | grads | optim | total B/param | ZeRO theory | off by |")
        print("|---|---|---|---|---|---|---|")
        rows = zero_table(args.world)
        for r in rows:
            off = r["total"] / r["theory"] - 1
            print(f"| {r['layout']} | {r['params']:.2f} | {r['grads']:.2f} | {r['optim']:.2f} | {r['total']:.2f} "
                  f"| {r['theory']:.2f} | {off:+.1%} |")
        if args.check and any(abs(r["total"] / r["theory"] - 1) > 0.10 for r in rows):
            sys.exit("memory differs from the ZeRO theory by more than 10%")
    if args.only != "zero":
        print("\n| activation checkpointing | activation MiB (batch 8 x 512 tokens) | saving vs none |")
        print("|---|---|---|")
        for r in activation_table():
            print(f"| {r['mode']} | {r['activation_bytes'] / 2**20:.0f} | {r['saving']:.0%} |")


if __name__ == "__main__":
    main()

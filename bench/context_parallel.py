"""Per-rank activation memory under context parallelism (gloo, CPU): one training step of a small model on
one long sequence, for cp in 1, 2, 4.

    python bench/context_parallel.py [--seq 16384] [--cps 1,2,4]

cp 1 is one process running the plain model (PyTorch's causal SDPA, no mask); cp > 1 is cp gloo ranks, each
holding 2 of the 2 x cp zigzag chunks of the sequence and running ring attention over them
(parallel/context_parallel.py, parallel/ring_attention.py). Every setting runs in a fresh process with
bench/memory.py's fixed glibc mmap threshold, so RSS follows live tensors. Per rank:
- saved: the bytes autograd saves for backward during the forward (activations, counted by a
  saved_tensors_hooks pack hook, each storage once), which is what context parallelism divides;
- of which attention: the same for the attention calls alone;
- activation peak: peak RSS during forward + backward above the RSS before it, minus the gradients
  (bench/memory.py's measure: everything the step allocates, transients included);
- peak RSS: the process's maximum resident memory (weights, allocator and interpreter included);
- step seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cybertron.models.presets import preset_config  # noqa: E402

MODEL = preset_config("debug", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=1 << 17)


class SavedBytes:
    """Bytes of the distinct storages autograd saves while active (tensors saved twice count once)."""

    def __init__(self, parent: SavedBytes | None = None):
        self.total = 0
        self.seen: set[int] = set()
        self.parent = parent  # nested hooks replace the outer ones: count there too

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.parent is not None:
            self.parent.pack(t)
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen and storage.nbytes():
            self.seen.add(storage.data_ptr())
            self.total += storage.nbytes()
        return t

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _measure(rank: int, cp: int, seq: int) -> dict:
    from cybertron.models.llama import build_model
    from cybertron.train.losses import cross_entropy_sum

    torch.set_num_threads(1)
    model = build_model(MODEL, seed=0)
    tokens = torch.randint(0, MODEL.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
    saved = SavedBytes()
    attention_bytes = SavedBytes(parent=saved)
    step = lambda m, b: (cross_entropy_sum(m(b["inputs"], positions=b.get("positions")), b["labels"]), {})
    if cp > 1:
        import torch.distributed as dist

        from cybertron.parallel.context_parallel import ContextParallelStep, apply_context_parallel

        context = apply_context_parallel(model, dist.group.WORLD)
        inner = context.__call__
        context_step = ContextParallelStep(step, context)
        run_step = lambda m, b: context_step(m, b)
    else:
        from cybertron.models.llama import causal_attention
        inner = causal_attention
        run_step = step
        context = None

    def counted_attention(q, k, v, mask=None):
        with attention_bytes.hooks():
            return inner(q, k, v, mask)

    for block in model.layers.values():
        block.self_attn.attention = counted_attention
    before = _rss_now()
    start = time.perf_counter()
    with saved.hooks():
        loss, _ = run_step(model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    return {"cp": cp, "rank": rank, "seq": seq, "tokens_per_rank": seq // cp, "saved_bytes": saved.total,
            "attention_saved_bytes": attention_bytes.total, "activation_bytes": peak_rss - before - grads,
            "peak_rss_bytes": peak_rss, "seconds": seconds}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# bench/memory.py's fixed mmap threshold: tensors above 128 KiB get their own mapping, returned when freed
_EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _worker(rank: int, cp: int, seq: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=cp, timeout=timedelta(seconds=1800))
    result = _measure(rank, cp, seq)
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(cp: int, seq: int, port: int) -> list[dict]:
    """One setting in a fresh process (and its spawned ranks) started with the fixed mmap threshold."""
    out = subprocess.run([sys.executable, __file__, "--child", str(cp), "--seq", str(seq), "--port", str(port)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **_EXACT_MALLOC})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(cp: int, seq: int, port: int) -> list[dict]:
    if cp == 1:
        return [_measure(0, 1, seq)]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(cp, seq, port, out), nprocs=cp, join=True)
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(cp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--cps", default="1,2,4")
    parser.add_argument("--port", type=int, default=29771)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.seq, args.port)))
        return
    mib = 1 << 20
    print(f"model dim {MODEL.dim}, {MODEL.n_layers} layers, {MODEL.n_heads} heads / {MODEL.n_kv_heads} kv, "
          f"sequence {args.seq}, fp32, torch {torch.__version__}")
    print("| cp | tokens/rank | saved for backward MiB/rank | of which attention | activation peak MiB/rank "
          "| peak RSS MiB/rank | step s |")
    print("|---|---|---|---|---|---|---|")
    for i, cp in enumerate(int(c) for c in args.cps.split(",")):
        results = run(cp, args.seq, args.port + i)
        worst = max(results, key=lambda r: r["saved_bytes"])
        rss = max(r["peak_rss_bytes"] for r in results)
        print(f"| {cp} | {worst['tokens_per_rank']} | {worst['saved_bytes'] / mib:.0f} | "
              f"{worst['attention_saved_bytes'] / mib:.0f} | "
              f"{max(r['activation_bytes'] for r in results) / mib:.0f} | {rss / mib:.0f} | "
              f"{max(r['seconds'] for r in results):.1f} |", flush=True)


if __name__ == "__main__":
    main()

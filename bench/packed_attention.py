"""Packed-document attention at long context: the former dense (B, 1, T, T) document mask vs the per-document
path (models/masks.py), forward and backward, one row of T tokens holding several documents and a padding tail.
Each variant runs in its own process and reports that process's peak resident memory above the inputs (CPU)
or peak allocated memory (CUDA), the best of `--repeat` timed steps, and its output's distance from the dense
path's (the same inputs in every process).

    python bench/packed_attention.py                          # CPU: T 8,192, 8 heads / 4 kv heads, hd 64
    python bench/packed_attention.py --device cuda --dtype bf16 --seq 32768
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# causal-row: the whole row as one causal sequence (no packing), the floor a mask-free kernel reaches.
VARIANTS = ("dense-mask", "documents", "documents-window", "causal-row")


def _positions(seq: int, gen: torch.Generator) -> torch.Tensor:
    # Documents of 256..2,048 tokens until 7/8 of the row, then padding (positions 0), as SFT packing leaves.
    pos, filled = [], 0
    while filled < seq * 7 // 8:
        n = min(int(torch.randint(256, 2049, (), generator=gen)), seq * 7 // 8 - filled)
        pos += range(n)
        filled += n
    return torch.tensor([pos + [0] * (seq - filled)])


def _inputs(args, dev):
    gen = torch.Generator().manual_seed(0)
    positions = _positions(args.seq, gen)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    q, k, v = (torch.randn(1, args.seq, n, args.head_dim, generator=gen).to(dev, dtype)
               for n in (args.heads, args.kv_heads, args.kv_heads))
    return positions.to(dev), q, k, v


def measure(variant: str, args) -> dict:
    from cybertron.models.llama import document_causal_mask
    from cybertron.models.masks import AttentionMask, masked_attention

    dev = torch.device(args.device)
    positions, q, k, v = _inputs(args, dev)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step() -> torch.Tensor:
        if variant == "causal-row":
            out = masked_attention(q, k, v, AttentionMask())
        elif variant == "dense-mask":
            mask = document_causal_mask(positions)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True).transpose(1, 2)
        else:
            window = args.window if variant == "documents-window" else None
            out = masked_attention(q, k, v, AttentionMask.from_positions(positions, window))
        out.float().square().sum().backward()
        if cuda:
            torch.cuda.synchronize()
        return out.detach()

    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    # The reference, computed after the peak was read: the dense path (windowed: the dense band mask).
    with torch.no_grad():
        mask = AttentionMask.from_positions(positions, args.window if variant == "documents-window" else None)
        if variant == "causal-row":
            mask = AttentionMask()
        qt, kt, vt = (x.detach().transpose(1, 2) for x in (q, k, v))
        dense = mask.dense(args.seq, 1, dev)
        ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=dense, enable_gqa=True).transpose(1, 2)
    docs = sum(1 for a, b, singles in mask.segments[0] if not singles) if mask.segments else 1
    return {"variant": variant, "peak_mib": peak / 2**20, "seconds": min(times), "documents": docs,
            "max_abs_diff_vs_dense": (out.float() - ref.float()).abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    print(f"torch {torch.__version__}, {args.device}, T={args.seq}, heads {args.heads}/{args.kv_heads}, "
          f"hd {args.head_dim}, {args.dtype}, window {args.window}")
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(json.dumps(result))


if __name__ == "__main__":
    main()

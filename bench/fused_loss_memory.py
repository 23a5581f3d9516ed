"""Peak memory of the output head + cross-entropy (forward and backward), plain vs `train.fused_loss`, for a
Llama-3 vocabulary (128,256). Each variant runs in its own process and reports that process's peak resident
memory (CPU) or peak allocated memory (CUDA) above what the inputs and weights take.

    python bench/fused_loss_memory.py                      # CPU: 2,048 tokens, hidden 512
    python bench/fused_loss_memory.py --device cuda --tokens 8192 --dim 2048 --dtype bf16
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


def measure(variant: str, tokens: int, dim: int, vocab: int, device: str, dtype: str) -> dict:
    from cybertron.train.fused_linear_ce import linear_cross_entropy_sum

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=g).to(dev).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.02).to(dev).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with autocast:
        if variant == "plain":
            loss = F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")
        else:
            loss = linear_cross_entropy_sum(hidden, weight, labels)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "peak_gib": peak / 2**30, "seconds": time.perf_counter() - start,
            "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.dim, args.vocab, args.device, args.dtype)))
        return
    logits_gib = args.tokens * args.vocab * 4 / 2**30
    print(f"tokens={args.tokens} dim={args.dim} vocab={args.vocab} device={args.device} dtype={args.dtype} "
          f"(fp32 logits alone: {logits_gib:.2f} GiB)")
    results = {}
    for variant in ("plain", "fused"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", variant], capture_output=True,
                             text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:<6} peak +{r['peak_gib']:.2f} GiB  {r['seconds']:.2f} s  loss {r['loss']:.3f}")
    print(f"fused / plain peak memory: {results['fused']['peak_gib'] / results['plain']['peak_gib']:.3f}")


if __name__ == "__main__":
    main()

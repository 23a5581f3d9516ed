"""Multi-LoRA serving throughput: a batch mixing three adapters vs the base alone, same weights, same run.

    python bench/multi_lora.py                       # tiny preset on CPU, 24 concurrent requests, rank 16
    python bench/multi_lora.py --shape llama3-1b     # on CUDA (random weights, bf16)

Variants, each `Engine.generate` of --concurrency greedy requests (prompt --prompt-len, --new-tokens each, end of
text ignored), timed in turns (round robin, best of --repeats) so a co-tenant's load hits all alike:
  base            the plain base model, no adapters loaded
  loaded, base    3 adapters loaded, every request on the base (the wrappers' no-adapter path)
  mixed 3         3 adapters loaded, requests spread over them round robin: every batch mixes all three
                  (the path multi_lora.py picks: dense while fewer adapters are loaded than rows in the call)
  mixed 3 + base  the same with a quarter of the requests on the base
  mixed 3, gather as "mixed 3", forced to gather each row's adapter weights and bmm (punica's BGMV shape)
  mixed 3, dense  as "mixed 3", forced to multiply by all adapters' stacked ranks and mask each row's block
  mixed 3, loop   as "mixed 3", but each wrapper loops over the distinct adapters of the batch (a segment per
                  adapter, rows found with nonzero: a host sync per layer), the alternative not taken
Adapters: random A and B of rank --rank on all seven projections. Prints aggregate tokens/s and the ratio to base.
Decode graphs are off for every variant (the loop variant reads device values on the host, which a graph cannot
capture), and so is prefix caching (the same prompts come back each round). Under a co-tenant's load, the ratio
reported is the median over rounds of each round's own ratio to base (variants of a round run back to back).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.multi_lora import LoraAdapter, LoraLayer, MultiLoRALinear
from cybertron.serve.sampling import SamplingParams

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", help="model preset (random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the best time of each is kept)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    return parser.parse_args()


def random_adapter(name: str, model: torch.nn.Module, rank: int, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and fqn.rsplit(".", 1)[-1] in TARGETS:
            layers[fqn] = LoraLayer(torch.randn(rank, m.in_features, generator=gen) / m.in_features ** 0.5,
                                    torch.randn(m.out_features, rank, generator=gen) * 0.01)
    return LoraAdapter(name, layers)


def loop_forward(self: MultiLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The segment alternative: one pair of matmuls per distinct adapter over its rows (host sync per layer)."""
    y = torch.nn.functional.linear(x, self.weight)
    index = self.rows.index
    if index is not None:
        for slot in index.unique().tolist():
            if slot == 0:
                continue
            rows = (index == slot).nonzero()[:, 0]
            y[rows] += (x[rows] @ self.a[slot]) @ self.b[slot]
    return y if self.bias is None else y + self.bias


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset_config(args.shape)
    base = build_model(cfg, device="cpu", seed=0).to(device, dtype).eval()
    adapters = [random_adapter(n, base, args.rank, s) for s, n in enumerate(("a", "b", "c"), start=1)]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.concurrency)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    # Prefix caching off: every round sends the same prompts, which would otherwise skip their prefill.
    kw = dict(max_batch_size=args.concurrency, block_size=16, decode_graphs=False, prefix_caching=False,
              num_blocks=args.concurrency * -(-(args.prompt_len + args.new_tokens) // 16) + 1)
    plain = Engine(base, **kw)
    served = Engine(copy.deepcopy(base), **kw, adapters=adapters)  # it wraps its model in place
    n = args.concurrency
    variants = {
        "base": (plain, [None] * n),
        "loaded, base": (served, [None] * n),
        "mixed 3": (served, [("a", "b", "c")[i % 3] for i in range(n)]),
        "mixed 3 + base": (served, [(None, "a", "b", "c")[i % 4] for i in range(n)]),
        "mixed 3, gather": (served, [("a", "b", "c")[i % 3] for i in range(n)]),
        "mixed 3, dense": (served, [("a", "b", "c")[i % 3] for i in range(n)]),
        "mixed 3, loop": (served, [("a", "b", "c")[i % 3] for i in range(n)]),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):  # round 0 warms up and is not kept
        for name, (engine, names) in variants.items():
            if name.endswith("loop"):
                MultiLoRALinear.forward, saved = loop_forward, MultiLoRALinear.forward
            served.lora.path = name.split(", ")[1] if name.endswith(("gather", "dense")) else "auto"
            start = time.perf_counter()
            engine.generate(prompts, params, names)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if name.endswith("loop"):
                MultiLoRALinear.forward = saved
            if round_:
                times[name].append(elapsed)
    tokens = n * args.new_tokens
    print(f"{args.shape} on {device} ({dtype}), {n} requests x {args.new_tokens} new tokens, prompt "
          f"{args.prompt_len}, rank {args.rank}, threads {args.threads}")
    print(f"{'variant':<16} {'best tokens/s':>14} {'vs base (median of rounds)':>27}")
    for name, seconds in times.items():
        ratio = statistics.median(b / t for b, t in zip(times["base"], seconds))
        print(f"{name:<16} {tokens / min(seconds):>14,.0f} {ratio:>27.2f}")


if __name__ == "__main__":
    main()

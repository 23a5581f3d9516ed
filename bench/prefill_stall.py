"""Decode stalls while a long prompt is admitted: chunked prefill vs whole-prompt prefill, same model, same run.

    python bench/prefill_stall.py                         # tiny preset with an 8k context, CPU
    python bench/prefill_stall.py --device cuda --shape llama3-1b --long-prompt 16384 --budget 2048

`--streams` requests decode steadily (greedy, end-of-text ignored); after `--warmup` steps one prompt of
`--long-prompt` tokens joins. The engine's per-step token budget (`max_prefill_tokens`, `--budget`) is the same
in both modes: chunked, the long prompt is prefilled a budget's worth per step while the streams keep decoding;
unchunked (chunked_prefill=False), it is prefilled whole in one step and every stream waits for it.

Figures per mode, over the window from the long prompt's arrival to `--after` steps past its first token:
  inter-token latency of the streams (p50, p99, max; the gap between consecutive tokens of one stream)
  the long prompt's time to first token, and the stream tokens produced per second in the window
Modes alternate `--repeats` times (a co-tenant's load on a shared machine hits both alike); each figure is the
median over the repeats. Weights are random: only time is measured. The prefix cache is off so that
repeats recompute everything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams

BLOCK = 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", help="model preset (random weights)")
    p.add_argument("--context", type=int, default=8192, help="max_seq_len override (>= long prompt + tokens)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-prompt", type=int, default=32)
    p.add_argument("--long-prompt", type=int, default=4096)
    p.add_argument("--budget", type=int, default=512, help="the engine's per-step token budget (both modes)")
    p.add_argument("--warmup", type=int, default=6, help="decode steps before the long prompt arrives")
    p.add_argument("--after", type=int, default=24, help="steps measured after the long prompt's first token")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: steadier when shared)")
    return p.parse_args()


def run_once(model: torch.nn.Module, args: argparse.Namespace, chunked: bool) -> dict[str, float]:
    steps_max = args.warmup + args.long_prompt // max(args.budget - args.streams, 1) + args.after + 4
    per_stream = args.stream_prompt + steps_max + 1
    num_blocks = args.streams * -(-per_stream // BLOCK) + -(-(args.long_prompt + args.after + 8) // BLOCK)
    engine = Engine(model, None, max_batch_size=args.streams + 1, num_blocks=num_blocks, block_size=BLOCK,
                    max_prefill_tokens=args.budget, chunked_prefill=chunked, prefix_caching=False)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times: list[list[float]] = [[] for _ in range(args.streams)]
    for i in range(args.streams):
        prompt = torch.randint(0, vocab, (args.stream_prompt,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=steps_max, ignore_eos=True),
                           on_output=lambda _o, i=i: times[i].append(time.perf_counter()))
    for _ in range(args.warmup):
        engine.step()
    long_prompt = torch.randint(0, vocab, (args.long_prompt,), generator=gen).tolist()
    first: list[float] = []
    arrival = time.perf_counter()
    engine.add_request(long_prompt, SamplingParams(temperature=0.0, max_tokens=args.after + 1, ignore_eos=True),
                       on_output=lambda _o: first.append(time.perf_counter()))
    while not first:
        engine.step()
    for _ in range(args.after):
        engine.step()
    end = time.perf_counter()
    gaps, produced = [], 0
    for stamps in times:
        window = [t for t in stamps if t > arrival]
        before = [t for t in stamps if t <= arrival]
        window = before[-1:] + window
        gaps += [b - a for a, b in zip(window, window[1:])]
        produced += len(window) - 1
    gaps.sort()
    return {"itl_p50_ms": 1e3 * statistics.median(gaps), "itl_p99_ms": 1e3 * _quantile(gaps, 0.99),
            "itl_max_ms": 1e3 * gaps[-1], "ttft_ms": 1e3 * (first[0] - arrival),
            "stream_tokens_per_s": produced / (end - arrival)}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(preset_config(args.shape, max_seq_len=args.context), device=device, seed=0)
    model = model.to(dtype).eval()
    runs: dict[str, list[dict[str, float]]] = {"chunked": [], "unchunked": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(run_once(model, args, chunked=mode == "chunked"))
    print(f"\n{args.streams} streams decoding while a {args.long_prompt}-token prompt is admitted; {args.shape} "
          f"(context {args.context}), {device.type}, budget {args.budget} tokens/step, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print("| mode | ITL p50 | ITL p99 | ITL max | long prompt TTFT | stream tokens/s |\n|---|---|---|---|---|---|")
    for mode, results in runs.items():
        m = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"| {mode} | {m['itl_p50_ms']:,.1f} ms | {m['itl_p99_ms']:,.1f} ms | {m['itl_max_ms']:,.1f} ms | "
              f"{m['ttft_ms']:,.0f} ms | {m['stream_tokens_per_s']:,.1f} |")


if __name__ == "__main__":
    main()

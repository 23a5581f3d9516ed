"""Decode throughput: cybertron's engine vs `transformers` generate, same random weights, same run.

    python bench/decode.py                      # tiny preset on CPU
    python bench/decode.py --shape llama3-1b    # on CUDA (random weights, bf16)

Prints batch-1 decode tokens/s and aggregate tokens/s with --concurrency requests, for cybertron and for
transformers (greedy, same prompt, same new-token count, end-of-text ignored), their ratio, and on CUDA
the share of the memory-bandwidth roofline (weight bytes read per token / measured device copy bandwidth).
For transformers, the default dynamic cache and cache_implementation="static" are both timed and the
faster one is compared against. The variants are timed in turns (round robin, best of --repeats), so a
co-tenant's load on a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from cybertron.models.hf import config_to_hf, our_key_to_hf
from cybertron.models.llama import Transformer, build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", help="model preset (random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the best time of each is kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads for both engines (default 1: on a shared 2-core machine, "
                             "OpenMP threads that wait for each other make 2-thread timings 10x noisier)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json-out", default="", help="append one JSON line per system and batch size here")
    return parser.parse_args()


def cybertron_runs(model: Transformer, prompts: list[list[int]], args) -> dict[str, Callable]:
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    engine = Engine(model, None, max_batch_size=len(prompts), block_size=16,
                    num_blocks=len(prompts) * -(-(args.prompt_len + args.new_tokens) // 16))
    return {"cybertron/1": lambda: engine.generate(prompts[:1], params)[0].token_ids,
            "cybertron/n": lambda: engine.generate(prompts, params)[0].token_ids}


def transformers_model(model: Transformer):
    import transformers

    dtype = next(model.parameters()).dtype
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(model.config, str(dtype).split(".")[-1]))
    with torch.device(next(model.parameters()).device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    state = {our_key_to_hf(k): v for k, v in model.state_dict().items()}
    missing, _ = hf.load_state_dict(state, strict=False)
    assert not [k for k in missing if "rotary" not in k and k != "lm_head.weight"], missing
    return hf.eval()


def transformers_runs(hf, prompts: list[list[int]], args) -> dict[str, Callable]:
    device = next(hf.parameters()).device
    batches = {"1": torch.tensor(prompts[:1], device=device), "n": torch.tensor(prompts, device=device)}
    runs = {}
    for cache in ("dynamic", "static"):
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=0)
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        for size, batch in batches.items():
            def run(batch=batch, kwargs=kwargs) -> list[int]:
                with torch.inference_mode():
                    return hf.generate(batch, **kwargs)[0, batch.shape[1]:].tolist()
            runs[f"transformers-{cache}/{size}"] = run
    return runs


def time_round_robin(runs: dict[str, Callable], repeats: int, sync: Callable) -> tuple[dict, dict]:
    """Best wall time of each run over `repeats` rounds, each round timing every run once."""
    outputs = {name: run() for name, run in runs.items()}  # warm-up: allocation, kernel choice
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the decode roofline's denominator."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best, _ = time_round_robin({"copy": lambda: dst.copy_(src)}, 10, lambda: torch.cuda.synchronize(device))
    return 2 * src.numel() / best["copy"]


def report(best: dict[str, float], outputs: dict, args, model: Transformer, device: torch.device) -> None:
    n = args.concurrency
    rate = {name: (1 if name.endswith("/1") else n) * args.new_tokens / t for name, t in best.items()}
    for system in dict.fromkeys(name.split("/")[0] for name in rate):
        print(f"  {system:<22} batch 1 {rate[system + '/1']:9.1f} tok/s   {n} concurrent "
              f"{rate[system + '/n']:9.1f} tok/s")
    hf = [s for s in ("transformers-dynamic", "transformers-static") if s + "/1" in rate]
    if hf:
        fastest = max(hf, key=lambda s: rate[s + "/1"])
        print(f"  cybertron / {fastest}: batch 1 x{rate['cybertron/1'] / rate[fastest + '/1']:.2f}, "
              f"{n} concurrent x{rate['cybertron/n'] / max(rate[s + '/n'] for s in hf):.2f} "
              f"(vs the faster transformers cache at each size)")
        same = sum(a == b for a, b in zip(outputs["cybertron/1"], outputs[fastest + "/1"]))
        print(f"  greedy tokens identical to transformers: {same}/{args.new_tokens}")
    if device.type == "cuda":
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        roofline = copy_bandwidth(device) / weight_bytes
        print(f"  batch-1 roofline {roofline:.1f} tok/s ({weight_bytes / 1e9:.2f} GB of weights per token): "
              f"cybertron reaches {rate['cybertron/1'] / roofline:.1%}")


def main() -> None:
    args = parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = preset_config(args.shape)
    model = build_model(cfg, device=device, seed=0).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.concurrency, args.prompt_len), generator=gen).tolist()
    print(f"shape {args.shape} ({cfg.num_params() / 1e6:.1f}M params, {dtype}) on {device}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    runs = cybertron_runs(model, prompts, args)
    if not args.skip_transformers:
        runs.update(transformers_runs(transformers_model(model), prompts, args))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best, outputs = time_round_robin(runs, args.repeats, sync)
    report(best, outputs, args, model, device)
    if args.json_out:
        write_json(best, args, device)


# --json-out (bench/gpu_suite.py): kept apart from the timing code above.
def write_json(best: dict, args: argparse.Namespace, device: torch.device) -> None:
    """One line per run name "SYSTEM/1" or "SYSTEM/n": end-to-end new tokens/s (best of --repeats). Peak memory
    is the process's (every system's model and cache resident together), an upper bound for each."""
    from results_jsonl import append_rows, process_peak_gib

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else process_peak_gib()
    rows = []
    for name, timing in best.items():
        system, size = name.split("/")
        batch = 1 if size == "1" else args.concurrency
        seconds = getattr(timing, "total_s", timing)  # a plain number of seconds, or a record with the total
        rows.append({"runner": system, "shape": args.shape, "batch": batch, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "tokens_per_s": batch * args.new_tokens / seconds,
                     "peak_mem_gib": peak, "peak_mem_kind": "process max allocated" if device.type == "cuda"
                     else "process peak RSS", "noise": f"best of {args.repeats} rounds after 1 warm-up round"})
    append_rows(args.json_out, "decode", device, rows)


if __name__ == "__main__":
    main()

"""Decode throughput: cybertron's engine vs `transformers` generate, same random weights, same run.

    python bench/decode.py                      # tiny preset on CPU
    python bench/decode.py --shape llama3-1b    # on CUDA (random weights, bf16)
    python bench/decode.py --prompt-len 2048 --concurrency 32 --attention paged,gather   # 2k context
    python bench/decode.py --prompt-len 1600 --shared-prefix 1536 --concurrency 16       # prefix-heavy
    python bench/decode.py --prompt-len 4000 --new-tokens 8 --concurrency 4              # long prompts

Prints batch-1 decode tokens/s and aggregate tokens/s with --concurrency requests, for cybertron and for
transformers (greedy, same prompts, same new-token count, end-of-text ignored), their ratio, and on CUDA
the share of the memory-bandwidth roofline (weight bytes read per token / measured device copy bandwidth).
With --split-prefill each system is also timed generating a single token (the prompts' prefill), which
gives the prefill time and the decode-only rate (the other new tokens over the time beyond prefill).
For transformers, the default dynamic cache, cache_implementation="static", and the static cache with
generate's torch.compile of the forward (its fastest documented configuration) can be timed (--hf); the
fastest at each size is compared against. cybertron runs once per --attention method (the block-table
path, and the earlier gather path for comparison). --shared-prefix N makes the first N prompt tokens of
every request the same (a long shared system prompt); prefix-cache statistics are printed when the engine
keeps them. The variants are timed in turns (round robin, best of --repeats), so a co-tenant's load on a
shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from cybertron.models.hf import config_to_hf, our_key_to_hf
from cybertron.models.llama import Transformer, build_model
from cybertron.models.presets import preset_config
from cybertron.serve.cache import ATTENTION_METHODS
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
    parser.add_argument("--attention", default="paged",
                        help=f"comma-separated cybertron attention methods to time ({', '.join(ATTENTION_METHODS)})")
    parser.add_argument("--hf", default="dynamic,static",
                        help="comma-separated transformers configurations: dynamic, static, static-compiled")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="the first N tokens of every prompt are the same (a shared system prompt)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="model context (default: the preset's, raised to fit prompt + new tokens)")
    parser.add_argument("--split-prefill", action="store_true",
                        help="also time 1-token runs: prefill time and decode-only rate")
    parser.add_argument("--skip-batch1", action="store_true", help="time only the --concurrency batch")
    args = parser.parse_args()
    for method in args.attention.split(","):
        if method not in ATTENTION_METHODS:
            parser.error(f"--attention: unknown method {method!r}; choose from {', '.join(ATTENTION_METHODS)}")
    for name in args.hf.split(","):
        if name not in HF_CONFIGS:
            parser.error(f"--hf: unknown configuration {name!r}; choose from {', '.join(HF_CONFIGS)}")
    if not 0 <= args.shared_prefix <= args.prompt_len:
        parser.error("--shared-prefix must be between 0 and --prompt-len")
    return args


HF_CONFIGS = ("dynamic", "static", "static-compiled")


def sizes(args) -> dict[str, int]:
    return ({} if args.skip_batch1 else {"1": 1}) | {"n": args.concurrency}


def new_token_counts(args) -> dict[str, int]:
    """Run suffix -> new tokens: the full run, and the prefill-only run with --split-prefill."""
    return {"": args.new_tokens} | ({"+prefill": 1} if args.split_prefill else {})


def cybertron_runs(model: Transformer, prompts: list[list[int]], args) -> tuple[dict[str, Callable], dict]:
    runs, engines = {}, {}
    for method in args.attention.split(","):
        engine = Engine(model, None, max_batch_size=len(prompts), block_size=16,
                        num_blocks=len(prompts) * -(-(args.prompt_len + args.new_tokens) // 16))
        engine.cache.attention = method
        engines[method] = engine
        for size, k in sizes(args).items():
            for suffix, new in new_token_counts(args).items():
                params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
                runs[f"cybertron-{method}/{size}{suffix}"] = (
                    lambda e=engine, p=params, k=k: e.generate(prompts[:k], p)[0].token_ids)
    return runs, engines


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
    from transformers import CompileConfig

    device = next(hf.parameters()).device
    batches = {size: torch.tensor(prompts[:k], device=device) for size, k in sizes(args).items()}
    runs = {}
    for config in args.hf.split(","):
        for suffix, new in new_token_counts(args).items():
            kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            if config != "dynamic":
                kwargs["cache_implementation"] = "static"
            if config == "static-compiled":
                # generate compiles the decoding forward itself for a static cache; off CUDA it has to be
                # asked to (_compile_all_devices), and CUDA graphs ("reduce-overhead") exist on CUDA only.
                compile_config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
                compile_config._compile_all_devices = True
                kwargs["compile_config"] = compile_config
            else:
                kwargs["disable_compile"] = True
            for size, batch in batches.items():
                def run(batch=batch, kwargs=kwargs) -> list[int]:
                    with torch.inference_mode():
                        return hf.generate(batch, **kwargs)[0, batch.shape[1]:].tolist()
                runs[f"transformers-{config}/{size}{suffix}"] = run
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
    rows = sizes(args)
    label = {size: "batch 1" if size == "1" else f"{k} concurrent" for size, k in rows.items()}
    rate = {}  # (system, size) -> end-to-end new tokens/s
    decode = {}  # (system, size) -> the new tokens after the first / the time beyond the prefill-only run
    for name, t in best.items():
        system, run = name.split("/")
        if run in rows:
            rate[system, run] = rows[run] * args.new_tokens / t
            if f"{name}+prefill" in best and args.new_tokens > 1:
                decode[system, run] = rows[run] * (args.new_tokens - 1) / max(t - best[f"{name}+prefill"], 1e-9)
    systems = list(dict.fromkeys(system for system, _ in rate))
    for system in systems:
        parts = []
        for size in rows:
            parts.append(f"{label[size]} {rate[system, size]:8.1f} tok/s")
            if (system, size) in decode:
                parts.append(f"(prefill {best[f'{system}/{size}+prefill']:.2f} s, "
                             f"decode {decode[system, size]:.1f} tok/s)")
        print(f"  {system:<30} " + "  ".join(parts))
    ours = [s for s in systems if s.startswith("cybertron-")]
    hf = [s for s in systems if s.startswith("transformers-")]
    for mine in ours if hf else []:
        for size in rows:
            fastest = max(hf, key=lambda s: rate[s, size])
            line = f"  {mine} / {fastest}, {label[size]}: x{rate[mine, size] / rate[fastest, size]:.2f} end to end"
            if (mine, size) in decode:
                quickest = min(hf, key=lambda s: best[f"{s}/{size}+prefill"])
                fastest_decode = max(hf, key=lambda s: decode[s, size])
                line += (f"; decode x{decode[mine, size] / decode[fastest_decode, size]:.2f} vs {fastest_decode}"
                         f"; prefill x{best[f'{quickest}/{size}+prefill'] / best[f'{mine}/{size}+prefill']:.2f}"
                         f" vs {quickest}")
            print(line)
        size = next(iter(rows))
        fastest = max(hf, key=lambda s: rate[s, size])
        same = sum(a == b for a, b in zip(outputs[f"{mine}/{size}"], outputs[f"{fastest}/{size}"]))
        print(f"  {mine}: greedy tokens of the first prompt identical to {fastest}: {same}/{args.new_tokens}")
    for a, b in zip(ours, ours[1:]):
        ratios = [f"{label[size]} x{rate[a, size] / rate[b, size]:.2f}"
                  + (f" (decode x{decode[a, size] / decode[b, size]:.2f})" if (a, size) in decode else "")
                  for size in rows]
        print(f"  {a} / {b}: " + ", ".join(ratios))
    if device.type == "cuda" and "1" in rows:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        roofline = copy_bandwidth(device) / weight_bytes
        print(f"  batch-1 roofline {roofline:.1f} tok/s ({weight_bytes / 1e9:.2f} GB of weights per token): "
              f"{ours[0]} reaches {rate[ours[0], '1'] / roofline:.1%}")


def print_prefix_stats(engines: dict[str, Engine]) -> None:
    """The engine's prefix-cache counters, when it keeps any (fields of engine.stats named for it)."""
    for method, engine in engines.items():
        stats = getattr(engine, "stats", None)
        fields = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else vars(stats or object())
        shown = {k: v for k, v in fields.items() if any(w in k for w in ("prefix", "hit", "cached"))}
        if shown:
            print(f"  cybertron-{method} prefix cache, all runs: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
        else:
            print(f"  cybertron-{method}: the engine keeps no prefix-cache statistics")


def main() -> None:
    args = parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    need = args.prompt_len + args.new_tokens
    cfg = preset_config(args.shape)
    cfg = preset_config(args.shape, max_seq_len=args.max_seq_len or max(cfg.max_seq_len, need))
    model = build_model(cfg, device=device, seed=0).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.concurrency, args.prompt_len), generator=gen)
    prompts[:, :args.shared_prefix] = prompts[0, :args.shared_prefix]
    prompts = prompts.tolist()
    print(f"shape {args.shape} ({cfg.num_params() / 1e6:.1f}M params, {dtype}, context {cfg.max_seq_len}) on "
          f"{device}, {torch.get_num_threads()} threads; prompt {args.prompt_len} ({args.shared_prefix} shared), "
          f"{args.new_tokens} new tokens, greedy; best of {args.repeats}")
    runs, engines = cybertron_runs(model, prompts, args)
    if not args.skip_transformers:
        runs.update(transformers_runs(transformers_model(model), prompts, args))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best, outputs = time_round_robin(runs, args.repeats, sync)
    report(best, outputs, args, model, device)
    print_prefix_stats(engines)


if __name__ == "__main__":
    main()

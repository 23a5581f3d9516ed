"""Decode throughput: cybertron's engine vs `transformers` generate, same random weights, same run.

    python bench/decode.py                      # tiny preset on CPU
    python bench/decode.py --shape llama3-1b    # on CUDA (random weights, bf16)
    python bench/decode.py --prompt-len 2048 --concurrency 32 --attention paged,gather   # 2k context
    python bench/decode.py --prompt-len 1600 --shared-prefix 1536 --concurrency 16       # prefix-heavy
    python bench/decode.py --prompt-len 3968 --new-tokens 8 --concurrency 4              # long prompts

For batch 1 and for --concurrency requests at once (greedy, the same prompts and new-token count, end of
text ignored) it prints, per system: the prefill time (until every request has its first token: all prompts
go in one batch), the decode rate (the other new tokens over the time after that), and the end-to-end rate
(all new tokens over the whole time); then cybertron's ratios to the fastest transformers configuration at
each figure, and on CUDA the share of the memory-bandwidth roofline (weight bytes read per token / measured
device copy bandwidth).

cybertron runs once per --attention method: "paged" (attention over the block table) and "gather" (the
earlier dense gather, for comparison). transformers runs in each --hf configuration: the default dynamic
cache, cache_implementation="static", and "static-compiled", the static cache with generate's own
torch.compile of the decoding forward (its fastest documented configuration). --shared-prefix N makes the
first N prompt tokens of every request the same (a long shared system prompt); the engine's prefix cache
is reset before each run, and its counters are printed when it keeps any. The variants are timed in turns
(round robin, best of --repeats for each figure), so a co-tenant's load on a shared machine hits all of them
alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from cybertron.models.hf import config_to_hf, our_key_to_hf
from cybertron.models.llama import Transformer, build_model
from cybertron.models.presets import preset_config
from cybertron.serve.cache import ATTENTION_METHODS
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams

HF_CONFIGS = ("dynamic", "static", "static-compiled")


@dataclasses.dataclass
class Timing:
    tokens: list[int]  # the first request's new tokens
    prefill_s: float  # until every request has its first new token
    decode_s: float  # from then until every request has all of them
    total_s: float  # the whole run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", help="model preset (random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the best of each figure is kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads for both engines (default 1: on a shared 2-core machine, "
                             "OpenMP threads that wait for each other make 2-thread timings 10x noisier)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-batch1", action="store_true", help="time only the --concurrency batch")
    parser.add_argument("--attention", default="paged",
                        help=f"comma-separated cybertron attention methods ({', '.join(ATTENTION_METHODS)})")
    parser.add_argument("--hf", default="dynamic,static-compiled",
                        help=f"comma-separated transformers configurations ({', '.join(HF_CONFIGS)})")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="the first N tokens of every prompt are the same (a shared system prompt)")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="the engine's step token budget (default: every prompt at once; smaller budgets "
                             "prefill long prompts in chunks over the context already cached)")
    parser.add_argument("--step-pairs", type=int, default=0,
                        help="then time this many decode steps of each attention method, alternated")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="model context (default: the preset's, raised to fit prompt + new tokens)")
    parser.add_argument("--json-out", default="", help="append one JSON line per system and batch size here")
    args = parser.parse_args()
    for flag, given, known in (("--attention", args.attention, ATTENTION_METHODS), ("--hf", args.hf, HF_CONFIGS)):
        for name in given.split(","):
            if name not in known:
                parser.error(f"{flag}: unknown {name!r}; choose from {', '.join(known)}")
    if not 0 <= args.shared_prefix <= args.prompt_len:
        parser.error("--shared-prefix must be between 0 and --prompt-len")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill token and at least one decoded)")
    args.room = max(args.new_tokens, args.step_pairs + 2)  # new tokens a request may need (context, KV)
    return args


def batch_sizes(args) -> dict[str, int]:
    return ({} if args.skip_batch1 else {"1": 1}) | {"n": args.concurrency}


def cybertron_runs(model: Transformer, prompts: list[list[int]], args) -> tuple[dict[str, Callable], dict]:
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    runs, engines = {}, {}
    for method in args.attention.split(","):
        # By default a step budget that admits every prompt at once, so the steps after the prefill only decode.
        engine = Engine(model, None, max_batch_size=len(prompts), block_size=16,
                        num_blocks=len(prompts) * -(-(args.prompt_len + args.room) // 16),
                        max_prefill_tokens=args.max_prefill_tokens or len(prompts) * args.prompt_len)
        engine.cache.attention = method
        engines[method] = engine
        for size, k in batch_sizes(args).items():
            runs[f"cybertron-{method}/{size}"] = lambda e=engine, k=k: _engine_run(e, prompts[:k], params)
    return runs, engines


def _engine_run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> Timing:
    # Each run starts cold: prefixes shared within the run may hit the prefix cache, the previous run's not.
    reset = getattr(engine, "reset_prefix_cache", None)
    if reset is not None:
        reset()
    sinks: list[list] = [[] for _ in prompts]
    start = time.perf_counter()
    for prompt, sink in zip(prompts, sinks):
        engine.add_request(prompt, params, on_output=sink.append)
    while not all(sinks):
        engine.step()
    prefill = time.perf_counter() - start
    while not all(sink[-1].finished for sink in sinks):
        engine.step()
    total = time.perf_counter() - start
    return Timing([t for o in sinks[0] for t in o.token_ids], prefill, total - prefill, total)


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


class _StepClock:
    """A logits processor that only notes when each forward's logits are ready (the first: prefill)."""

    def __init__(self, sync: Callable) -> None:
        self.sync, self.times = sync, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def transformers_runs(hf, prompts: list[list[int]], args, sync: Callable) -> dict[str, Callable]:
    from transformers import CompileConfig, LogitsProcessorList

    device = next(hf.parameters()).device
    runs = {}
    for config in args.hf.split(","):
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=0)
        if config != "dynamic":
            kwargs["cache_implementation"] = "static"
        if config == "static-compiled":
            # generate compiles the decoding forward itself for a static cache; off CUDA it has to be asked to
            # (_compile_all_devices), and CUDA graphs ("reduce-overhead") exist on CUDA only.
            compile_config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
            compile_config._compile_all_devices = True
            kwargs["compile_config"] = compile_config
        else:
            kwargs["disable_compile"] = True
        for size, k in batch_sizes(args).items():
            batch = torch.tensor(prompts[:k], device=device)

            def run(batch=batch, kwargs=kwargs) -> Timing:
                clock = _StepClock(sync)
                start = time.perf_counter()
                with torch.inference_mode():
                    out = hf.generate(batch, logits_processor=LogitsProcessorList([clock]), **kwargs)
                    tokens = out[0, batch.shape[1]:].tolist()
                total = time.perf_counter() - start
                return Timing(tokens, clock.times[0] - start, clock.times[-1] - clock.times[0], total)
            runs[f"transformers-{config}/{size}"] = run
    return runs


def time_round_robin(runs: dict[str, Callable[[], Timing]], repeats: int,
                     sync: Callable) -> dict[str, Timing]:
    """Each run's best prefill, decode and total time (each the best of its own) over `repeats` rounds, each
    round timing every run once (after one untimed warm-up round: allocation, kernel choice, compilation)."""
    best = {name: run() for name, run in runs.items()}
    best = {name: Timing(t.tokens, float("inf"), float("inf"), float("inf")) for name, t in best.items()}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            t = run()
            sync()
            for field in ("prefill_s", "decode_s", "total_s"):
                setattr(best[name], field, min(getattr(best[name], field), getattr(t, field)))
    return best


def interleaved_steps(engines: dict[str, Engine], prompts: list[list[int]], args, sync: Callable) -> None:
    """Decode steps of the attention methods alternated one by one on the concurrent batch, after every
    prompt is prefilled: load that drifts over seconds hits each method alike, unlike whole runs in turns."""
    params = SamplingParams(temperature=0.0, max_tokens=args.step_pairs + 2, ignore_eos=True)
    for engine in engines.values():
        reset = getattr(engine, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        sinks: list[list] = [[] for _ in prompts]
        for prompt, sink in zip(prompts, sinks):
            engine.add_request(prompt, params, on_output=sink.append)
        while not all(sinks):
            engine.step()
    times: dict[str, list[float]] = {method: [] for method in engines}
    for _ in range(args.step_pairs):
        for method, engine in engines.items():
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            times[method].append(time.perf_counter() - start)
    for engine in engines.values():
        while engine.has_unfinished():
            engine.step()
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"  interleaved decode steps of {len(prompts)} rows at context {args.prompt_len}+ ({args.step_pairs} each): "
          + ", ".join(f"{m} {min(times[m]) * 1e3:.1f} ms best / {med[m] * 1e3:.1f} ms median "
                      f"({len(prompts) / med[m]:.1f} tok/s)" for m in engines))
    methods = list(engines)
    for a, b in zip(methods, methods[1:]):
        print(f"  {a} / {b} decode step rate: x{med[b] / med[a]:.2f} by median, "
              f"x{min(times[b]) / min(times[a]):.2f} by best")


def time_once(fn: Callable, repeats: int, sync: Callable) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the decode roofline's denominator."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_once(lambda: dst.copy_(src), 10, lambda: torch.cuda.synchronize(device))


def report(best: dict[str, Timing], args, model: Transformer, device: torch.device) -> None:
    sizes = batch_sizes(args)
    label = {size: "batch 1" if size == "1" else f"{k} concurrent" for size, k in sizes.items()}
    # figure -> (system, size) -> value; higher is better for every figure
    figures: dict[str, dict[tuple[str, str], float]] = {"end to end tok/s": {}, "decode tok/s": {},
                                                        "prefill (1/s)": {}}
    for name, t in best.items():
        system, size = name.split("/")
        k = sizes[size]
        figures["end to end tok/s"][system, size] = k * args.new_tokens / t.total_s
        figures["decode tok/s"][system, size] = k * (args.new_tokens - 1) / t.decode_s
        figures["prefill (1/s)"][system, size] = 1 / t.prefill_s
    systems = list(dict.fromkeys(name.split("/")[0] for name in best))
    for system in systems:
        parts = [f"{label[size]}: prefill {best[f'{system}/{size}'].prefill_s:7.3f} s, decode "
                 f"{figures['decode tok/s'][system, size]:8.1f} tok/s, end to end "
                 f"{figures['end to end tok/s'][system, size]:8.1f} tok/s" for size in sizes]
        print(f"  {system:<30} " + " | ".join(parts))
    ours = [s for s in systems if s.startswith("cybertron-")]
    hf = [s for s in systems if s.startswith("transformers-")]
    for mine in ours if hf else []:
        for size in sizes:
            parts = []
            for figure, values in figures.items():
                rival = max(hf, key=lambda s: values[s, size])
                parts.append(f"{figure.split(' ')[0]} x{values[mine, size] / values[rival, size]:.2f} ({rival})")
            print(f"  {mine} vs fastest transformers, {label[size]}: " + ", ".join(parts))
        first = next(iter(sizes))
        rival = max(hf, key=lambda s: figures["end to end tok/s"][s, first])
        same = sum(a == b for a, b in zip(best[f"{mine}/{first}"].tokens, best[f"{rival}/{first}"].tokens))
        print(f"  {mine}: greedy tokens of the first prompt identical to {rival}: {same}/{args.new_tokens}")
    for a, b in zip(ours, ours[1:]):
        parts = [f"{label[size]}: decode x{figures['decode tok/s'][a, size] / figures['decode tok/s'][b, size]:.2f},"
                 f" end to end x{figures['end to end tok/s'][a, size] / figures['end to end tok/s'][b, size]:.2f}"
                 for size in sizes]
        print(f"  {a} / {b}: " + " | ".join(parts))
    if device.type == "cuda" and "1" in sizes:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        roofline = copy_bandwidth(device) / weight_bytes
        print(f"  batch-1 roofline {roofline:.1f} tok/s ({weight_bytes / 1e9:.2f} GB of weights per token): "
              f"{ours[0]} decodes at {figures['decode tok/s'][ours[0], '1'] / roofline:.1%} of it")


def print_prefix_stats(engines: dict[str, Engine], runs: int) -> None:
    """The engine's prefix-cache counters, when it keeps any (fields of engine.stats named for them), per
    run of the concurrent batch (the counters add up every run: warm-up, repeats, both batch sizes)."""
    for method, engine in engines.items():
        stats = getattr(engine, "stats", None)
        fields = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else vars(stats or object())
        shown = {k: v for k, v in fields.items() if any(w in k for w in ("prefix", "hit", "cached"))}
        if shown:
            print(f"  cybertron-{method} prefix cache, {runs} runs in all: "
                  + ", ".join(f"{k} {v} ({v / runs:.0f} per run)" for k, v in shown.items()))
        else:
            print(f"  cybertron-{method}: the engine keeps no prefix-cache statistics")


def main() -> None:
    args = parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = preset_config(args.shape)
    need = args.prompt_len + args.room
    cfg = preset_config(args.shape, max_seq_len=args.max_seq_len or max(cfg.max_seq_len, need))
    model = build_model(cfg, device=device, seed=0).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.concurrency, args.prompt_len), generator=gen)
    prompts[:, :args.shared_prefix] = prompts[0, :args.shared_prefix]
    print(f"shape {args.shape} ({cfg.num_params() / 1e6:.1f}M params, {dtype}, context {cfg.max_seq_len}) on "
          f"{device}, {torch.get_num_threads()} threads; prompt {args.prompt_len} ({args.shared_prefix} shared), "
          f"{args.new_tokens} new tokens, greedy; best of {args.repeats}")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    runs, engines = cybertron_runs(model, prompts.tolist(), args)
    if not args.skip_transformers:
        runs.update(transformers_runs(transformers_model(model), prompts.tolist(), args, sync))
    best = time_round_robin(runs, args.repeats, sync)
    report(best, args, model, device)
    if args.json_out:
        write_json(best, args, device)
    print_prefix_stats(engines, (args.repeats + 1) * len(batch_sizes(args)))
    if args.step_pairs:
        interleaved_steps(engines, prompts.tolist(), args, sync)


def write_json(best: dict[str, Timing], args: argparse.Namespace, device: torch.device) -> None:
    """One line per system and batch size: end-to-end new tokens/s (the figure compared), with the decode rate
    and prefill time beside it. Peak memory is the process's (every system's model and cache resident
    together), an upper bound for each."""
    from results_jsonl import append_rows, process_peak_gib

    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else process_peak_gib()
    sizes, rows = batch_sizes(args), []
    for name, t in best.items():
        system, size = name.split("/")
        k = sizes[size]
        rows.append({"runner": system, "shape": args.shape, "batch": k, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "tokens_per_s": k * args.new_tokens / t.total_s,
                     "decode_tokens_per_s": k * (args.new_tokens - 1) / t.decode_s, "prefill_s": t.prefill_s,
                     "peak_mem_gib": peak, "peak_mem_kind": "process max allocated" if cuda else "process peak RSS",
                     "noise": f"best of {args.repeats} rounds after 1 warm-up round (each figure its own best)"})
    append_rows(args.json_out, "decode", device, rows)


if __name__ == "__main__":
    main()

"""Decode throughput: cybertron's engine vs `transformers` generate, same random weights, same run.

    python bench/decode.py                      # tiny preset on CPU
    python bench/decode.py --shape llama3-1b    # on CUDA (random weights, bf16)

Prints batch-1 decode tokens/s and aggregate tokens/s with --concurrency requests, for cybertron and for
transformers (greedy, same prompt and new-token count; on CPU both the default dynamic cache and
cache_implementation="static" are timed and the faster is reported), their ratio, and on CUDA the share of
the memory-bandwidth roofline (weight bytes per token / measured device copy bandwidth).
"""

from __future__ import annotations

import argparse
import time

import torch

from cybertron.models.hf import config_to_hf, our_key_to_hf
from cybertron.models.llama import Transformer, build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", help="model preset (random weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--skip-transformers", action="store_true")
    return parser.parse_args()


def best_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up: allocations, kernel selection, compilation
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def cybertron_rates(model: Transformer, prompts: list[list[int]], args, sync) -> tuple[float, float, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    engine = Engine(model, None, max_batch_size=len(prompts), block_size=16,
                    num_blocks=len(prompts) * -(-(args.prompt_len + args.new_tokens) // 16))
    first: list[int] = []

    def one() -> None:
        first[:] = engine.generate(prompts[:1], params)[0].token_ids

    def many() -> None:
        engine.generate(prompts, params)

    t1 = best_time(one, args.repeats, sync)
    tn = best_time(many, args.repeats, sync)
    return args.new_tokens / t1, len(prompts) * args.new_tokens / tn, first


def transformers_model(model: Transformer):
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(model.config, str(_dtype(model)).split(".")[-1]))
    with torch.device(_device(model)):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=_dtype(model))
    state = {our_key_to_hf(k): v for k, v in model.state_dict().items()}
    missing, _ = hf.load_state_dict(state, strict=False)
    assert not [k for k in missing if "rotary" not in k and k != "lm_head.weight"], missing
    return hf.eval()


def transformers_rates(hf, prompts: list[list[int]], args, sync) -> tuple[float, float, str, list[int]]:
    device = next(hf.parameters()).device
    batch1 = torch.tensor(prompts[:1], device=device)
    batchn = torch.tensor(prompts, device=device)
    first: list[int] = []
    best = (0.0, 0.0, "", first)
    for cache in ("dynamic", "static"):
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=0)
        if cache == "static":
            kwargs["cache_implementation"] = "static"

        def one(kwargs=kwargs) -> None:
            with torch.inference_mode():
                first[:] = hf.generate(batch1, **kwargs)[0, len(prompts[0]):].tolist()

        def many(kwargs=kwargs) -> None:
            with torch.inference_mode():
                hf.generate(batchn, **kwargs)

        t1 = best_time(one, args.repeats, sync)
        tn = best_time(many, args.repeats, sync)
        rates = (args.new_tokens / t1, len(prompts) * args.new_tokens / tn)
        print(f"  transformers {cache:>7} cache: batch 1 {rates[0]:8.1f} tok/s, "
              f"{len(prompts)} concurrent {rates[1]:8.1f} tok/s")
        if rates[0] > best[0]:
            best = (*rates, cache, list(first))
    return best


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the decode roofline's denominator."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), 5, lambda: torch.cuda.synchronize(device))
    return 2 * src.numel() / seconds


def _dtype(model: Transformer) -> torch.dtype:
    return next(model.parameters()).dtype


def _device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset_config(args.shape)
    model = build_model(cfg, device=device, seed=0).to(dtype).eval()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.concurrency, args.prompt_len), generator=gen).tolist()
    print(f"shape {args.shape} ({cfg.num_params() / 1e6:.1f}M params, {dtype}) on {device}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    ours1, oursn, our_tokens = cybertron_rates(model, prompts, args, sync)
    print(f"  cybertron             : batch 1 {ours1:8.1f} tok/s, {args.concurrency} concurrent "
          f"{oursn:8.1f} tok/s")
    if not args.skip_transformers:
        hf1, hfn, cache, hf_tokens = transformers_rates(transformers_model(model), prompts, args, sync)
        print(f"  ratio cybertron / transformers ({cache} cache): batch 1 x{ours1 / hf1:.2f}, "
              f"{args.concurrency} concurrent x{oursn / hfn:.2f}")
        same = sum(a == b for a, b in zip(our_tokens, hf_tokens))
        print(f"  greedy tokens identical to transformers: {same}/{len(our_tokens)}")
    if device.type == "cuda":
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        roofline = copy_bandwidth(device) / weight_bytes
        print(f"  batch-1 roofline {roofline:.1f} tok/s ({weight_bytes / 1e9:.2f} GB of weights per token): "
              f"cybertron reaches {ours1 / roofline:.1%}")


if __name__ == "__main__":
    main()

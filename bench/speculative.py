"""Speculative decoding: acceptance rate and speedup over plain decoding, same model, same run.

    python bench/speculative.py --run RUN_DIR       # a trained cybertron run (or a Hugging Face directory)
    python bench/speculative.py                     # first trains the default run into --work (minutes)

Workload: code from the bundled corpus (stdlib files, a window from the middle of each), continued
greedily (or with --temperature) for --new-tokens tokens, end-of-text ignored. A small model trained on
code repeats its context a lot, which is what prompt lookup feeds on. Variants, each a fresh engine:

- plain: no speculation
- ngram: prompt lookup (k, n from 1 to 3)
- draft-L<n>: the target's first n layers with its embedding, final norm and head as the draft
- draft-self: the target as its own draft (acceptance 100% when greedy: the upper bound of a draft, and its
  cost: the draft does all of the target's work again)

Each is timed at batch 1 (the prompts one after another) and with all prompts in one batch, in turns
(round robin, best of --repeats), so a co-tenant's load hits all of them alike. Greedy outputs are checked
to be identical to plain decoding.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cybertron.data.sources import list_source_files
from cybertron.models.llama import Transformer, build_model
from cybertron.runs import load_for_inference
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.speculative import SpeculativeConfig
from cybertron.serve.verify import SpeculativeStats


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="", help="trained run or HF directory; empty = train the default run")
    parser.add_argument("--work", default="/tmp/cybertron-bench-speculative", help="where the default run goes")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="tokens proposed per step")
    parser.add_argument("--draft-layers", type=int, default=1, help="layers of the truncated draft")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the best time of each is kept)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: steadier on shared cores)")
    return parser.parse_args()


def trained_run(args) -> Path:
    run = Path(args.work) / "run"
    if not (run / "checkpoints").is_dir():
        print(f"training the default run into {run} ...", flush=True)
        subprocess.run([sys.executable, "-m", "cybertron", "train", "--out", str(run), "--data.cache_dir",
                        str(Path(args.work) / "cache")], check=True)
    return run


def code_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """A window of `length` tokens from the middle of every 97th stdlib file long enough (fixed choice)."""
    prompts = []
    for file in list_source_files(None)[::97]:
        ids = tokenizer.encode(file.read_text(errors="replace"))
        if len(ids) >= 4 * length:
            middle = len(ids) // 2
            prompts.append(ids[middle:middle + length])
        if len(prompts) == n:
            break
    return prompts


def truncated(model: Transformer, n_layers: int) -> Transformer:
    """The model's first n_layers blocks with its embedding, final norm and head (no training)."""
    draft = build_model(type(model.config)(**{**vars(model.config), "n_layers": n_layers})).eval()
    draft.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers})
    return draft


def variants(model: Transformer, args) -> dict[str, SpeculativeConfig | None]:
    return {"plain": None,
            "ngram": SpeculativeConfig("ngram", k=args.k, ngram_min=1, ngram_max=3),
            f"draft-L{args.draft_layers}": SpeculativeConfig("draft", k=args.k,
                                                             draft=truncated(model, args.draft_layers)),
            "draft-self": SpeculativeConfig("draft", k=args.k, draft=model)}


def runs(model: Transformer, prompts: list[list[int]], args) -> tuple[dict[str, Callable], dict[str, Engine]]:
    params = [SamplingParams(temperature=args.temperature, max_tokens=args.new_tokens, ignore_eos=True, seed=i)
              for i in range(len(prompts))]
    blocks = len(prompts) * -(-(args.prompt_len + args.new_tokens + args.k + 1) // 16)
    out, engines = {}, {}
    for name, spec in variants(model, args).items():
        engine = Engine(model, None, max_batch_size=len(prompts), num_blocks=blocks, block_size=16,
                        speculative=spec)
        engines[name] = engine
        out[name + "/1"] = lambda e=engine: [e.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
        out[name + "/n"] = lambda e=engine: [r.token_ids for r in e.generate(prompts, params)]
    return out, engines


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    source = Path(args.run) if args.run else trained_run(args)
    model, tokenizer, _ = load_for_inference(source, False, device=torch.device("cpu"))
    prompts = code_prompts(tokenizer, args.prompts, args.prompt_len)
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"{source.name}: {model.config.num_params() / 1e6:.2f}M params, {model.config.n_layers} layers, "
          f"{torch.get_num_threads()} threads; {len(prompts)} code prompts of {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, {mode}, k={args.k}")
    timed, engines = runs(model, prompts, args)
    outputs = {name: run() for name, run in timed.items()}  # warm-up, and what the variants generate
    speculating = {name: e.speculator for name, e in engines.items() if e.speculator is not None}
    stats = {name: speculator.stats for name, speculator in speculating.items()}  # of the warm-up's runs
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(args.repeats):
        for speculator in speculating.values():
            speculator.stats = SpeculativeStats()
        for name, run in timed.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    tokens = len(prompts) * args.new_tokens
    for name in engines:
        line = f"  {name:<10}"
        for size in ("1", "n"):
            rate = tokens / best[f"{name}/{size}"]
            speedup = best[f"plain/{size}"] / best[f"{name}/{size}"]
            line += f"  batch {size}: {rate:7.1f} tok/s x{speedup:.2f}"
        if name in stats:
            s = stats[name]
            line += f"  acceptance {s.acceptance_rate:.1%}, {s.emitted / max(s.steps, 1):.2f} tokens/verification"
        if args.temperature == 0:
            same = all(outputs[f"{name}/{size}"] == outputs[f"plain/{size}"] for size in ("1", "n"))
            line += "" if same else "  OUTPUT DIFFERS FROM PLAIN"
        print(line, flush=True)


if __name__ == "__main__":
    main()

"""Structured output: what the grammar mask costs per token, constrained vs free decoding in the same run.

    python bench/structured.py                         # tiny preset, 32k-token BPE, CPU
    python bench/structured.py --device cuda --shape llama3-1b

The tokenizer is a byte-level BPE trained on the stdlib's source with --vocab tokens (the mask's cost grows
with the vocabulary, so a toy vocabulary would flatter it); the model has random weights. Every variant
generates exactly --new-tokens tokens per request (end-of-text banned with logit_bias -100, and the grammars
are JSON Lines, which never end): free text, objects following a schema (free-text strings, an integer, an
array of strings) and any JSON objects.
Variants are timed in turns, best of --repeats, so a co-tenant's load hits all alike. Prints tokens/s per
variant at batch 1 and at --concurrency, greedy (the mask's cost alone: choosing is one argmax either way)
and sampled at temperature 1 (where top-p's sort over the vocabulary is part of each step, and a mask that
leaves few tokens changes its cost), with the overhead per token against free decoding; plus the time to
compile a schema once and to fetch it from the cache, and the host's share per token alone.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch

from cybertron.data.tokenizer import train_bpe_tokenizer
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams, mask_logits
from cybertron.serve.structured import GrammarCompiler, schema_text, token_mask

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def json_lines(schema: dict) -> str:
    """Lark: one JSON value under `schema` per line, as many lines as the budget allows."""
    return f'start: line+\nline: %json {schema_text(schema)} "\\n"\n'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", help="model preset (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary trained on the stdlib")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def stdlib_texts(limit_chars: int = 6_000_000) -> list[str]:
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="ignore"))
        total += len(texts[-1])
        if total > limit_chars:
            break
    return texts


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(stdlib_texts(), vocab_size=args.vocab)
    print(f"tokenizer: {tokenizer.vocab_size} tokens, trained in {time.perf_counter() - start:.1f} s")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(preset_config(args.shape, vocab_size=tokenizer.vocab_size), seed=0).to(args.device, dtype)
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size)
    start = time.perf_counter()
    schema = compiler.lark(json_lines(SCHEMA), "bench")
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    compiler.lark(json_lines(SCHEMA), "bench")
    cached = time.perf_counter() - start
    print(f"schema: first compile (tokenizer bridge included) {compiled * 1e3:.1f} ms, from the cache "
          f"{cached * 1e6:.0f} us")
    grammars = {"free": None, "json_schema": schema, "json_object": compiler.lark(json_lines({"type": "object"}), "b")}
    ban_eos = ((tokenizer.eos_id, -100.0),)
    engine = Engine(model, tokenizer, max_batch_size=args.concurrency, block_size=16,
                    num_blocks=args.concurrency * -(-(16 + args.new_tokens) // 16) + 8)
    prompt = tokenizer.encode("def parse(data):\n    return json.loads(")[:16]

    def run(grammar, n: int, temperature: float = 1.0):
        params = [SamplingParams(temperature=temperature, seed=i, max_tokens=args.new_tokens, logit_bias=ban_eos,
                                 grammar=grammar) for i in range(n)]
        results = engine.generate([prompt] * n, params)
        assert all(len(r.token_ids) == args.new_tokens for r in results), [(r.finish_reason, r.text) for r in results]
        return results

    # The host's share alone, replayed over generated tokens: the library's mask and the matcher's advance,
    # then applying the mask to one row of logits.
    for name in ("json_schema", "json_object"):
        tokens = run(grammars[name], 1)[0].token_ids
        matcher, row = grammars[name].matcher(), torch.empty(1, (model.config.vocab_size + 31) // 32, dtype=torch.int32)
        start = time.perf_counter()
        for token in tokens:
            matcher.fill(row[0])
            matcher.advance(token)
        fill = (time.perf_counter() - start) / len(tokens)
        logits = torch.randn(1, model.config.vocab_size, device=args.device)
        mask = token_mask([grammars[name].matcher()], model.config.vocab_size, args.device)
        start = time.perf_counter()
        for _ in range(100):
            mask_logits(logits, mask)
        applied = (time.perf_counter() - start) / 100
        print(f"{name}: mask + advance {fill * 1e6:.0f} us per token, applying the mask {applied * 1e6:.0f} us "
              f"(vocab {model.config.vocab_size})")

    runs = {(name, n, t): (lambda g=g, n=n, t=t: run(g, n, t))
            for t in (0.0, 1.0) for n in (1, args.concurrency) for name, g in grammars.items()}
    for fn in runs.values():
        fn()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            best[key] = min(best[key], time.perf_counter() - start)
    print("| decoding | batch | variant | tokens/s | vs free | overhead per token (per row) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for (name, n, t), seconds in best.items():
        rate = n * args.new_tokens / seconds
        free = best[("free", n, t)]
        per_step = (seconds - free) / args.new_tokens
        print(f"| {'greedy' if t == 0 else 'sampled'} | {n} | {name} | {rate:,.0f} | x{free / seconds:.2f} | "
              f"{per_step * 1e6:,.0f} us per step ({per_step / n * 1e6:,.0f} us per row) |")


if __name__ == "__main__":
    main()

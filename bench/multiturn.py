"""Multi-turn GRPO rollouts (align/multiturn.py) with and without the engine's prefix cache.

    python bench/multiturn.py                      # CPU: the debug preset, 8 prompts x 8 episodes, 3 turns
    python bench/multiturn.py --device cuda --preset llama3-1b --max-new-tokens 128

Each turn of an episode is a new engine request whose prompt is the whole conversation so far. With the
prefix cache, the earlier turns' full KV blocks are found instead of prefilled again. A random-weight model
(a byte-level BPE trained here on calculator word problems) runs episodes of an environment that answers
every turn with a short tool result and ends the episode after `--turns` turns. Reported per rollout (after
one warm-up rollout): prompt tokens the turns' requests carried, how many were prefilled and how many the
cache served, generated tokens, seconds and generated tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from cybertron.align.environments import EnvStep
from cybertron.align.environments.calculator import problem
from cybertron.align.multiturn import EpisodeRunner
from cybertron.align.preference_data import PromptRecord
from cybertron.data.chat_template import DEFAULT_CHAT_TEMPLATE
from cybertron.data.tokenizer import train_bpe_tokenizer
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: steadier on a shared machine)")
    return p.parse_args()


def make_environment(turns: int) -> type:
    class Tool:
        tools = [{"name": "calculator", "parameters": {"type": "object", "properties": {}}}]

        def __init__(self) -> None:
            self.turns = 0

        def reset(self, record: dict) -> list[dict]:
            return [{"role": "user", "content": record["prompt"]}]

        def step(self, messages: list[dict], turn) -> EnvStep:
            self.turns += 1
            if self.turns == turns:
                return EnvStep([], 1.0, True)
            return EnvStep([{"role": "tool", "content": f"result {self.turns}"}])

    return Tool


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    texts = [json.dumps(problem(rng)) for _ in range(300)]
    tokenizer = train_bpe_tokenizer(texts, 320)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    seq_len = 512
    model = build_model(preset_config(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=seq_len),
                        device=args.device, seed=0).eval()
    records = [PromptRecord([], problem(rng)["prompt"], {}, "bench") for _ in range(args.prompts)]
    episodes = args.prompts * args.group_size
    print(f"{args.preset} on {args.device}, {args.prompts} prompts x {args.group_size} episodes, {args.turns} turns "
          f"of at most {args.max_new_tokens} tokens, {torch.get_num_threads()} threads")
    print("| prefix cache | prompt tokens | prefilled | from the cache | generated | seconds | generated tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for caching in (True, False):
        engine = Engine(model, tokenizer, max_batch_size=episodes, num_blocks=episodes * (seq_len // 16),
                        block_size=16, device=args.device, decode_graphs=False, prefix_caching=caching)
        runner = EpisodeRunner(engine, tokenizer, make_environment(args.turns), "bench", args.turns,
                               args.max_new_tokens, seq_len)
        runner.run(records, args.group_size, 1.0, 1.0, seed=0, step=0)  # warm-up
        s = engine.stats
        before = (s.prompt_tokens, s.prefill_tokens, s.prefix_hit_tokens)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = runner.run(records, args.group_size, 1.0, 1.0, seed=0, step=1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        generated = sum(sum(r.generated) for r in results)
        print(f"| {'on' if caching else 'off'} | {s.prompt_tokens - before[0]:,} | {s.prefill_tokens - before[1]:,} | "
              f"{s.prefix_hit_tokens - before[2]:,} | {generated:,} | {seconds:.2f} | {generated / seconds:,.0f} |")


if __name__ == "__main__":
    main()

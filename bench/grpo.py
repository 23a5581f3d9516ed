"""The online alignment methods on one device: rollout tokens/s and where a step's time goes (generate,
reference, train) for grpo, rloo, reinforce++ and ppo.

    python bench/grpo.py                                       # CPU: a small random model (below), 12 steps
    python bench/grpo.py --methods all                         # the four methods, one after the other
    python bench/grpo.py --shape llama3-1b --device cuda --max-new-tokens 256 --steps 20    # one GPU

Runs the real `cybertron align --method METHOD` (an AlignConfig -> validate -> run_align) on a random-weight
Hugging Face directory written here (default: dim 256, 4 layers, 4 heads / 2 kv heads, FFN 512, vocab 384;
`--shape PRESET` uses a cybertron preset instead), prompts of 4-12 random words, and a deterministic reward
in a temporary file (the share of the completion's characters that are letters of `--word`); `--prompt-words`
sets the prompt lengths (e.g. 48-64 for prompts that fill a few KV blocks). Each step samples
`--group-size` completions for each of `--prompts` prompts with cybertron's engine on the policy itself
(end-of-text still ends a completion), computes the KL reference's log-probabilities, then takes one
optimizer step.

Measured over the steps after the first `--warmup` (totals over those steps):
  rollout tokens/s  generated completion tokens / seconds of generation (from metrics.jsonl)
  generate share    generation seconds / step seconds (metrics.jsonl `generate_share`)
  reference share   seconds in the rollout's no-grad forwards: `token_logprobs` (the KL reference; the old
                    policy when align.updates_per_rollout > 1 or for reinforce++'s KL-shaped rewards) and, for
                    ppo, `rollout_logprobs_and_values` (old policy + the value head) / step seconds
  train share       seconds in `Trainer.train_step` (forward, backward, clip, AdamW) / step seconds
  other share       the rest: reward function, padding rows, moving them to the device
  step time, steps/s
  prefix hit rate   prompt tokens found in the engine's prefix cache / prompt tokens the rollouts processed
                    (hits + prefilled): the group's copies of a prompt share its full KV blocks
  prefill saved     prompt tokens per step that were not prefilled thanks to the cache
`--prefix-caching off` builds the engine with prefix_caching=False (the "before" of the same run).
The reference and train times come from timing wrappers around those two functions for the duration of the
run (they synchronise CUDA before reading the clock); everything else is run_align's own logging.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # cybertron from this checkout
WORDS = ("the cat dog sat on mat red blue green one two three what is color of sky sea grass "
         "hello hi thanks yes no please tell me a story about small big").split()
# The CPU default: big enough that generation and training both cost something, small enough for 2 cores.
SMALL = dict(vocab_size=384, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=512,
             tie_embeddings=False)
REWARD_SOURCE = '''
def reward(prompts, completions, **fields):
    """Share of the completion's characters that are letters of {word!r}: deterministic, in [0, 1], and not
    flat for a random model (a whole-word match almost never happens, so every group would score the same)."""
    return [sum(c in {word!r} for c in text) / max(len(text), 1) for text in completions]
'''


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="", help="a cybertron preset (llama3-1b, ...) with random weights; empty = "
                                               "the small CPU model")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="train.dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16")
    p.add_argument("--methods", default="grpo", help="comma-separated align.method values (grpo, rloo, "
                                                     "reinforce++, ppo) or all; each runs on the same model")
    p.add_argument("--weights", default="full", choices=["full", "lora"], help="finetune.method")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (train.global_batch_size)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--kl-coef", type=float, default=0.04, help="0 = no reference forward")
    p.add_argument("--word", default="the", help="the reward counts the letters of this word")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: steadier on a shared machine)")
    p.add_argument("--prompt-words", default="4-12", help="words per prompt, LOW-HIGH (uniform)")
    p.add_argument("--prefix-caching", default="on", choices=["on", "off"], help="the engine's prefix cache")
    p.add_argument("--keep", default="", help="write the model and run directories here instead of a temp dir")
    return p.parse_args()


# The tokenizer of tests/unit/finetune/tiny_hf.py (bench/ does not import tests/): a byte-level BPE of 384 tokens
# trained on sentences of WORDS, with ChatML's special tokens and template.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def write_tokenizer(out: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)], trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "chat_template": CHATML}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_model_dir(out: Path, shape: str, seed: int = 0) -> Path:
    """A random-weight Hugging Face directory (config.json, safetensors, tokenizer.json) of `shape`."""
    from cybertron.models.hf import save_hf_model
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config

    cfg = preset_config(shape) if shape else preset_config("tiny", **SMALL)
    model = build_model(cfg, device="cpu", seed=seed)
    save_hf_model(model.state_dict(), cfg, out)
    write_tokenizer(out)  # 384 tokens: a preset's larger vocabulary still holds them
    return out


def write_prompts(path: Path, n: int, words: tuple[int, int] = (4, 12), seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))}) + "\n")
    return path


def write_reward(path: Path, word: str) -> str:
    path.write_text(REWARD_SOURCE.format(word=word))
    return f"{path}:reward"


class StepClock:
    """Seconds spent per optimizer step in the KL reference forward and in Trainer.train_step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending_reference = 0.0
        self.steps: list[dict[str, float]] = []
        self.generations: list[dict[str, int]] = []  # per rollout: the engine's prefill counters

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def wrap_reference(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self._now()
            out = fn(*args, **kwargs)
            self.pending_reference += self._now() - start
            return out
        return timed

    def wrap_train_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            start = self._now()
            out = fn(trainer, *args, **kwargs)
            self.steps.append({"train_s": self._now() - start, "reference_s": self.pending_reference})
            self.pending_reference = 0.0
            return out
        return timed

    def wrap_generate(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Engine.generate, recording how many prompt tokens each call prefilled and found cached (an engine
        without those counters, such as an older checkout's, records None)."""
        def counted(engine: Any, *args: Any, **kwargs: Any) -> Any:
            names = ("prefix_hit_tokens", "prefill_tokens")
            before = [getattr(engine.stats, n, None) for n in names]
            out = fn(engine, *args, **kwargs)
            self.generations.append({n: None if b is None else getattr(engine.stats, n) - b
                                     for n, b in zip(names, before)})
            return out
        return counted


@contextlib.contextmanager
def instrumented(clock: StepClock, prefix_caching: bool) -> Iterator[None]:
    """Time the reference forward and the train step inside run_align, count the engine's prefill work, and
    build the engine with or without its prefix cache; restore everything afterwards."""
    import functools

    import cybertron.align.grpo_task as grpo_task
    from cybertron.serve.engine import Engine
    from cybertron.train.trainer import Trainer

    original_logprobs, original_step = grpo_task.token_logprobs, Trainer.train_step
    original_generate, original_engine = Engine.generate, grpo_task.Engine
    original_values = getattr(grpo_task, "rollout_logprobs_and_values", None)  # None in a checkout before ppo
    grpo_task.token_logprobs = clock.wrap_reference(original_logprobs)
    if original_values is not None:
        grpo_task.rollout_logprobs_and_values = clock.wrap_reference(original_values)
    Trainer.train_step = clock.wrap_train_step(original_step)
    Engine.generate = clock.wrap_generate(original_generate)
    if not prefix_caching:
        grpo_task.Engine = functools.partial(Engine, prefix_caching=False)
    try:
        yield
    finally:
        grpo_task.token_logprobs, Trainer.train_step = original_logprobs, original_step
        Engine.generate, grpo_task.Engine = original_generate, original_engine
        if original_values is not None:
            grpo_task.rollout_logprobs_and_values = original_values


def run_grpo(args: argparse.Namespace, work: Path, method: str = "grpo") -> tuple[list[dict[str, Any]], StepClock]:
    """Run `cybertron align --method METHOD` through run_align; (its per-step metrics records, the clock)."""
    from cybertron.align.config import AlignConfig, validate
    from cybertron.commands.align import run as run_align
    from cybertron.train.precision import resolve_device

    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():  # one random model for every method of this run
        make_model_dir(model_dir, args.shape)
    prompt_count = args.prompts * (args.steps + 1)
    cfg = AlignConfig()
    cfg.model.path = str(model_dir)
    words = tuple(int(w) for w in args.prompt_words.split("-"))
    cfg.data.path = str(write_prompts(work / "prompts.jsonl", prompt_count, words))
    cfg.data.seq_len = 2 * words[1] + 40 + args.max_new_tokens  # a prompt is ~1-2 tokens a word + the template
    cfg.data.val_fraction = 0.0
    cfg.align.method = method
    cfg.align.reward = write_reward(work / "reward.py", args.word)
    cfg.align.group_size = args.group_size
    cfg.align.max_new_tokens = args.max_new_tokens
    cfg.align.kl_coef = args.kl_coef
    cfg.finetune.method = args.weights
    t = cfg.train
    t.steps, t.global_batch_size, t.device, t.dtype = args.steps, args.prompts, args.device, args.dtype
    t.lr = 1e-5 if args.weights == "full" else 1e-4
    cfg.eval.every = 0
    cfg.checkpoint.every = 0
    cfg.log.every, cfg.log.tensorboard, cfg.log.progress = 1, False, "lines"
    cfg.run.out = str(work / f"run-{method}")
    validate(cfg)
    clock = StepClock(resolve_device(args.device))
    with instrumented(clock, args.prefix_caching == "on"):
        run = run_align(cfg)
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "rollout_tokens_per_s" in r], clock


def summarize_prefill(generations: list[dict[str, int | None]], warmup: int) -> dict[str, float | None]:
    """Prefix hit rate and prompt tokens saved per rollout, over the rollouts after `warmup`."""
    measured = generations[warmup:]
    if not measured or measured[0]["prefix_hit_tokens"] is None:
        return {"prefix_hit_rate": None, "prefill_saved": None, "prefill_tokens": None}
    hits = sum(g["prefix_hit_tokens"] for g in measured)
    prefilled = sum(g["prefill_tokens"] for g in measured)
    return {"prefix_hit_rate": hits / max(hits + prefilled, 1), "prefill_saved": hits / len(measured),
            "prefill_tokens": prefilled / len(measured)}


def summarize(records: list[dict[str, Any]], clock: list[dict[str, float]], rollouts: int,
              warmup: int) -> dict[str, float]:
    """Totals over the steps after `warmup`: shares are part seconds / step seconds summed over those steps
    (so they add up to 1), rates are totals over totals. A step's seconds are those run_align measured:
    generation seconds (completion tokens / rollout tokens/s) / generate_share."""
    assert len(records) == len(clock), (len(records), len(clock))
    total = {"tokens": 0.0, "generate_s": 0.0, "reference_s": 0.0, "train_s": 0.0, "step_s": 0.0}
    measured = list(zip(records, clock, strict=True))[warmup:]
    for record, timed in measured:
        tokens = record["completion_len"] * rollouts
        generate_s = tokens / record["rollout_tokens_per_s"]
        for key, value in [("tokens", tokens), ("generate_s", generate_s), ("reference_s", timed["reference_s"]),
                           ("train_s", timed["train_s"]), ("step_s", generate_s / record["generate_share"])]:
            total[key] += value
    shares = {f"{k[:-2]}_share": total[k] / total["step_s"] for k in ("generate_s", "reference_s", "train_s")}
    return {"rollout_tokens_per_s": total["tokens"] / total["generate_s"], **shares,
            "other_share": 1 - sum(shares.values()), "step_s": total["step_s"] / len(measured),
            "completion_len": total["tokens"] / rollouts / len(measured),
            "reward": statistics.mean(r["reward"] for r, _ in measured),
            "zero_adv_groups": statistics.mean(r["zero_adv_groups"] for r, _ in measured)}


def print_table(args: argparse.Namespace, summary: dict[str, float], measured: int, method: str = "grpo") -> None:
    shape = args.shape or "small (dim 256, 4 layers, vocab 384)"
    print(f"\n{method}, {shape}, {args.weights} weights, {args.prompts} prompts x {args.group_size} completions, "
          f"max_new_tokens {args.max_new_tokens}, kl_coef {args.kl_coef}, prefix caching {args.prefix_caching}; "
          f"{measured} steps after "
          f"{args.warmup} warmup, {torch.get_num_threads()} threads")
    print("| figure | value |\n| --- | --- |")
    s = summary
    for name, value in [("rollout tokens/s", f"{s['rollout_tokens_per_s']:,.0f}"),
                        ("mean completion length", f"{s['completion_len']:.1f} tokens"),
                        ("generate share", f"{s['generate_share']:.1%}"),
                        ("reference log-prob share", f"{s['reference_share']:.1%}"),
                        ("train share (fwd+bwd+optimizer)", f"{s['train_share']:.1%}"),
                        ("other (reward, rows, transfer)", f"{s['other_share']:.1%}"),
                        ("step time", f"{s['step_s'] * 1e3:,.0f} ms"),
                        ("steps/s", f"{1 / s['step_s']:.3f}"),
                        ("reward (mean) / groups with no signal", f"{s['reward']:.3f} / {s['zero_adv_groups']:.0%}"),
                        *_prefill_rows(s)]:
        print(f"| {name} | {value} |")


def _prefill_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    if s["prefix_hit_rate"] is None:
        return [("prefix hit rate", "n/a (this engine has no prefix cache counters)")]
    return [("prefix hit rate (prompt tokens)", f"{s['prefix_hit_rate']:.1%}"),
            ("prompt tokens prefilled / saved per rollout",
             f"{s['prefill_tokens']:,.0f} / {s['prefill_saved']:,.0f}")]


def print_comparison(summaries: dict[str, dict[str, Any]]) -> None:
    """One row per method: the figures that tell the methods' costs apart."""
    print("\n| method | rollout tokens/s | generate | reference (+ old/values) | train | other | step time | reward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, s in summaries.items():
        print(f"| {method} | {s['rollout_tokens_per_s']:,.0f} | {s['generate_share']:.1%} | "
              f"{s['reference_share']:.1%} | {s['train_share']:.1%} | {s['other_share']:.1%} | "
              f"{s['step_s'] * 1e3:,.0f} ms | {s['reward']:.3f} |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ["grpo", "rloo", "reinforce++", "ppo"] if args.methods == "all" else args.methods.split(",")
    summaries: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        work = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for method in methods:
            records, clock = run_grpo(args, work, method)
            summaries[method] = {**summarize(records, clock.steps, args.prompts * args.group_size, args.warmup),
                                 **summarize_prefill(clock.generations, args.warmup)}
            print_table(args, summaries[method], len(records) - args.warmup, method)
    if len(methods) > 1:
        print_comparison(summaries)


if __name__ == "__main__":
    main()

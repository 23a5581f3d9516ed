"""DPO step throughput: cybertron (`run_align`) vs TRL's DPOTrainer, same model, same data, one process.

    python bench/dpo.py                                    # CPU: the small random model of bench/grpo.py, fp32
    python bench/dpo.py --weights lora                     # LoRA (peft on TRL's side, same rank/alpha/targets)
    python bench/dpo.py --shape llama3-1b --device cuda --batch 8 --prompt-words 256 --response-words 256
    python bench/dpo.py --method kto --frameworks cybertron        # KTO: --batch labelled completions per step
    python bench/dpo.py --method online_dpo --frameworks cybertron # online DPO: --batch prompts, 2 samples each

kto and online_dpo run on cybertron's side only (see the section "kto and online_dpo" below).

Both sides load the same random-weight Hugging Face directory and train on the same synthetic preference pairs
(plain text: a prompt of --prompt-words random words, a chosen response drawn from one half of the vocabulary
of words and a rejected one from the other half, so there is something to learn). Both sides tokenize them to
the same ids, prompt + response + end-of-text; a word is one token (a prompt's first word, without its leading
space, sometimes two), so sequences differ by at most one token and padding is negligible. Settings shared by
both: sigmoid DPO loss with beta --beta, --batch pairs per optimizer step without accumulation, AdamW (betas
0.9/0.999, eps 1e-8, no weight decay) at a constant --lr, gradient clipping at 1.0, reference
log-probabilities precomputed before training (cybertron always does; TRL with
`precompute_ref_log_probs=True`), fp32 on CPU and bf16 autocast on CUDA (over fp32 weights; LoRA: over a bf16
base, as cybertron's model.dtype=auto, with fp32 adapters). TRL runs its fastest documented setup available
here: activation checkpointing off (TRL turns it on by default; cybertron's align does not checkpoint), no
evaluation, no saving, `report_to=[]`, logging only at the end, `dataloader_num_workers=0`; `padding_free` is
not used: TRL 1.16 ignores it ("temporarily unavailable") and there is no padding to remove anyway.

Measured: the wall time between the ends of consecutive optimizer steps (a timing wrapper around cybertron's
`Trainer.train_step`; a `TrainerCallback.on_step_end` on TRL's side; CUDA is synchronised before each clock
read), after --warmup steps, as pairs/s and tokens/s (non-padding tokens of the batches trained on). Setup,
reference precompute and the final checkpoint are outside the timed window. The two frameworks run
--repeats times each, alternating which goes first; the median is reported. Per-step losses are recorded on
both sides (no extra sync) and printed: both start at ln 2 = 0.693 (policy = reference) and should fall alike.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/grpo.py: the shared model directory
from grpo import WORDS, make_model_dir  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="", help="a cybertron preset (llama3-1b, ...) with random weights; empty = "
                                               "the small CPU model of bench/grpo.py")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--weights", default="full", choices=["full", "lora"])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), all seven projections")
    p.add_argument("--pairs", type=int, default=256, help="preference pairs in the data set")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the timing (at least 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each framework, alternating which goes first")
    p.add_argument("--prompt-words", type=int, default=48, help="prompt length (one token per word)")
    p.add_argument("--response-words", type=int, default=48, help="chosen and rejected length (one token per word)")
    p.add_argument("--lr", type=float, default=0.0, help="0 = 1e-6 for full weights, 1e-5 for LoRA")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: steadier on a shared machine)")
    p.add_argument("--frameworks", default="cybertron,trl", help="comma-separated: cybertron, trl")
    p.add_argument("--json-out", default="", help="append one JSON line per framework to this file")
    p.add_argument("--method", default="dpo", choices=["dpo", "kto", "online_dpo"],
                   help="kto and online_dpo: cybertron only (--frameworks cybertron)")
    args = p.parse_args()
    if args.method != "dpo" and args.frameworks != "cybertron":
        p.error(f"--method {args.method} runs on cybertron's side only: add --frameworks cybertron")
    return args


def write_pairs(path: Path, n: int, prompt_words: int, response_words: int, seed: int = 0) -> Path:
    """Plain-text pairs; responses start with a space so prompt and response tokenize the same apart or joined."""
    rng = random.Random(seed)
    good, bad = WORDS[: len(WORDS) // 2], WORDS[len(WORDS) // 2:]
    words = lambda pool, k: " ".join(rng.choice(pool) for _ in range(k))
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": words(WORDS, prompt_words), "chosen": " " + words(good, response_words),
                                "rejected": " " + words(bad, response_words)}) + "\n")
    return path


@dataclass
class Timeline:
    """Per optimizer step: the clock at its end, its loss and its non-padding tokens (tensors read at the end)."""

    device: torch.device
    ends: list[float] = field(default_factory=list)
    rollout: dict[str, float] = field(default_factory=dict)  # online_dpo: rollout tokens/s and generate share
    losses: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())

    def rates(self, warmup: int, pairs_per_step: int) -> dict[str, float]:
        """From the end of step `warmup` (>= 1) to the end of the last step; ends[k] is the end of step k + 1."""
        steps = len(self.ends) - warmup
        seconds = self.ends[-1] - self.ends[warmup - 1]
        tokens = sum(float(t) for t in self.tokens[warmup:])
        return {"pairs_per_s": steps * pairs_per_step / seconds, "tokens_per_s": tokens / seconds,
                "ms_per_step": 1e3 * seconds / steps}

    def loss_curve(self) -> list[float]:
        return [float(x) for x in self.losses]


@contextlib.contextmanager
def timed_train_step(timeline: Timeline) -> Iterator[None]:
    """Record each cybertron Trainer.train_step's end, loss and tokens; restore the method afterwards."""
    from cybertron.train.trainer import Trainer

    original = Trainer.train_step

    def train_step(trainer: Trainer, step: int, micro_batches: list[dict[str, torch.Tensor]], *rest: Any,
                   **kwargs: Any) -> Any:  # rest: Trainer.train_step's optional arguments (the veto)
        result = original(trainer, step, micro_batches, *rest, **kwargs)
        timeline.mark()
        timeline.losses.append(result.loss.detach())
        # every sequence the step forwards: chosen + rejected (dpo, online_dpo), completion + mismatched pair (kto)
        timeline.tokens.append(sum(v.sum() for b in micro_batches for k, v in b.items() if k.endswith("_len")))
        return result

    Trainer.train_step = train_step
    try:
        yield
    finally:
        Trainer.train_step = original


def run_cybertron(args: argparse.Namespace, model_dir: Path, data: Path, seq_len: int, out: Path) -> Timeline:
    from cybertron.align.config import AlignConfig, validate
    from cybertron.commands.align import run as run_align

    cfg = AlignConfig()
    cfg.model.path, cfg.data.path, cfg.data.seq_len, cfg.data.val_fraction = str(model_dir), str(data), seq_len, 0.0
    cfg.align.method, cfg.align.beta = args.method, args.beta
    if args.method == "online_dpo":
        cfg.data.path, cfg.align.reward = str(data.parent / "prompts.jsonl"), f"{data.parent / 'reward.py'}:good"
        cfg.align.max_new_tokens = args.response_words
    elif args.method == "kto":
        cfg.data.path = str(data.parent / "kto.jsonl")
    cfg.finetune.method, cfg.finetune.rank, cfg.finetune.alpha = args.weights, args.rank, 2.0 * args.rank
    cfg.finetune.targets = ",".join(TARGETS)
    t = cfg.train
    t.steps, t.global_batch_size, t.micro_batch_size, t.lr = args.steps, args.batch, 0, args.lr
    t.warmup_steps, t.min_lr_ratio, t.weight_decay, t.grad_clip = 0, 1.0, 0.0, 1.0
    t.device, t.dtype = args.device, "bf16" if args.device == "cuda" else "fp32"
    cfg.eval.every, cfg.checkpoint.every = 0, 0
    # online_dpo logs every step: its rollout statistics (rollout tokens/s, generate share) come from the log
    cfg.log.every = 1 if args.method == "online_dpo" else args.steps
    cfg.log.tensorboard, cfg.log.progress = False, "lines"
    cfg.run.out = str(out)
    validate(cfg)
    timeline = Timeline(torch.device(args.device))
    with timed_train_step(timeline):
        run_align(cfg)
    if args.method == "online_dpo":
        timeline.rollout = rollout_log(out, args.warmup)
    return timeline


def run_trl(args: argparse.Namespace, model_dir: Path, data: Path, seq_len: int, out: Path) -> Timeline:
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    timeline = Timeline(torch.device(args.device))

    class StepEnd(transformers.TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            timeline.mark()

    class RecordingDPOTrainer(trl.DPOTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kwargs: Any) -> torch.Tensor:
            timeline.tokens.append(inputs["attention_mask"].sum())
            loss = super().training_step(model, inputs, *rest, **kwargs)
            timeline.losses.append(loss.detach())
            return loss

    # As cybertron's model.dtype=auto: a LoRA base is stored in bf16 under bf16 autocast, full weights in fp32.
    dtype = torch.bfloat16 if args.device == "cuda" and args.weights == "lora" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    peft_config = None
    if args.weights == "lora":
        import peft

        peft_config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                      target_modules=TARGETS, task_type="CAUSAL_LM")
    config = trl.DPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=args.beta, loss_type=["sigmoid"], max_length=seq_len, precompute_ref_log_probs=True,
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", logging_steps=10**6, report_to=[],
        gradient_checkpointing=False, activation_checkpointing=False,  # TRL defaults to True; cybertron: off
        save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    dataset = datasets.Dataset.from_list([json.loads(line) for line in data.read_text().splitlines()])
    trainer = RecordingDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=peft_config, callbacks=[StepEnd()])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # its one print at the end
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    print(f"[trl] optimizer {type(optimizer).__name__} fused={optimizer.defaults.get('fused')}, activation "
          f"checkpointing {trainer.args.activation_checkpointing}", flush=True)
    return timeline


def main() -> None:
    args = parse_args()
    args.lr = args.lr or (1e-6 if args.weights == "full" else 1e-5)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    runners: dict[str, Callable[..., Timeline]] = {"cybertron": run_cybertron, "trl": run_trl}
    runners = {name: run for name, run in runners.items() if name in args.frameworks.split(",")}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    curves: dict[str, list[list[float]]] = {name: [] for name in runners}
    seq_len = 2 + args.prompt_words + args.response_words + 8  # bos, eos and slack: nothing is cut
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work / "model", args.shape)
        data = write_pairs(work / "pairs.jsonl", args.pairs, args.prompt_words, args.response_words)
        write_kto_and_prompts(data)
        for repeat in range(args.repeats):
            order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
            for name in order:
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                timeline = runners[name](args, model_dir, data, seq_len, work / f"{name}-{repeat}")
                assert len(timeline.ends) == len(timeline.losses) == args.steps, (name, len(timeline.ends))
                results[name].append({**timeline.rates(args.warmup, args.batch), **timeline.rollout})
                results[name][-1]["peak_gib"] = peak_gib(args.device)
                curves[name].append(timeline.loss_curve())
                gc.collect()  # the finished run's model and optimizer go before the next one is built
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                print(f"[{name} run {repeat + 1}] {json.dumps(results[name][-1])}", flush=True)
    report(args, results, curves)
    if args.json_out:
        write_json(args, results)


def peak_gib(device: str) -> float:
    """CUDA: max allocated since the run started; CPU: the process's peak resident set so far (an upper bound)."""
    from results_jsonl import process_peak_gib

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else process_peak_gib()


def write_json(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> None:
    from results_jsonl import append_rows

    noise = f"median of {args.repeats} runs (alternating order) of {args.steps - args.warmup} timed steps " \
            f"after {args.warmup}"
    append_rows(args.json_out, "dpo", args.device, [
        {"runner": name, "method": args.method, "shape": args.shape or "grpo-small", "weights": args.weights,
         "batch_pairs": args.batch,
         "prompt_words": args.prompt_words, "response_words": args.response_words,
         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
         "pairs_per_s": statistics.median(r["pairs_per_s"] for r in runs),
         "peak_mem_gib": max(r["peak_gib"] for r in runs),
         "peak_mem_kind": "max allocated" if args.device == "cuda" else "process peak RSS", "noise": noise}
        for name, runs in results.items()])


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]],
           curves: dict[str, list[list[float]]]) -> None:
    shape = args.shape or "small (dim 256, 4 layers, vocab 384)"
    tokens_per_pair = 2 * (args.prompt_words + args.response_words + 1)
    unit = {"dpo": "pairs", "kto": "completions", "online_dpo": "prompts (2 samples each)"}[args.method]
    print(f"\n{args.method}, {shape}, {args.weights} weights, {args.batch} {unit} x ~{tokens_per_pair} tokens per "
          "step, "
          f"{args.device} ({'fp32' if args.device == 'cpu' else 'bf16 autocast'}, {torch.get_num_threads()} "
          f"threads), lr {args.lr:g}, {args.steps} steps of which the first {args.warmup} are not timed, "
          f"median of {args.repeats} runs (losses: the first run)")
    print("| framework | pairs/s | tokens/s | ms/step | loss step 1 | loss last step | mean loss last 5 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    median = {}
    for name, runs in results.items():
        median[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        curve = curves[name][0]
        m = median[name]
        print(f"| {name} | {m['pairs_per_s']:,.1f} | {m['tokens_per_s']:,.0f} | {m['ms_per_step']:,.0f} | "
              f"{curve[0]:.4f} | {curve[-1]:.4f} | {statistics.mean(curve[-5:]):.4f} |")
        if "rollout_tokens_per_s" in m:
            print(f"\nonline_dpo rollouts: {m['rollout_tokens_per_s']:,.0f} generated tokens/s while generating; "
                  f"generation {100 * m['generate_share']:.0f}% of the step, training (reference log-probs, "
                  f"forward, backward, optimizer) {100 * (1 - m['generate_share']):.0f}%")
    if not {"cybertron", "trl"} <= set(median):
        return
    ratio = median["cybertron"]["pairs_per_s"] / median["trl"]["pairs_per_s"]
    per_run = [c["pairs_per_s"] / t["pairs_per_s"] for c, t in zip(results["cybertron"], results["trl"], strict=True)]
    print(f"\ncybertron / TRL pairs/s: {ratio:.3f} (per repeat: {', '.join(f'{r:.3f}' for r in per_run)}); "
          f"tokens/s ratio {median['cybertron']['tokens_per_s'] / median['trl']['tokens_per_s']:.3f}; "
          f"ln 2 = {math.log(2):.4f}")


# ---- kto and online_dpo ---------------------------------------------------------------------------------------
# Cybertron's side only: TRL is not installed here, and its OnlineDPOTrainer generates with `transformers` or vLLM
# rather than with the trained weights in place, so a comparison would time different work. KTO trains on the
# pairs' responses as unpaired completions (chosen desirable, rejected undesirable: --batch completions per
# step, each forwarded with its mismatched pair for the KL estimate); online DPO samples up to --response-words
# tokens twice per prompt from the policy and prefers the longer text (see write_kto_and_prompts).

def write_kto_and_prompts(pairs: Path) -> None:
    """kto.jsonl, prompts.jsonl and reward.py next to the pairs file, from its records."""
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    with (pairs.parent / "kto.jsonl").open("w") as f:
        for i, r in enumerate(records):
            good = i % 2 == 0
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen" if good else "rejected"],
                                "label": good}) + "\n")
    (pairs.parent / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in records))
    # A random model's samples seldom hold whole words: a reward on words would tie nearly every pair (weight 0,
    # no gradient); the text's length in characters separates almost all of them.
    (pairs.parent / "reward.py").write_text("def good(prompts, completions, **fields):\n"
                                            "    return [float(len(c)) for c in completions]\n")


def rollout_log(run_dir: Path, warmup: int) -> dict[str, float]:
    """Median rollout tokens/s and mean generate share of the steps after `warmup`, from the run's log."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "rollout_tokens_per_s" in r and r["step"] > warmup]
    return {"rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in rows),
            "generate_share": statistics.mean(r["generate_share"] for r in rows)}


if __name__ == "__main__":
    main()

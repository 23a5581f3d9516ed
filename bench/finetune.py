"""LoRA fine-tuning throughput and peak memory: cybertron vs `transformers` + `peft`, same model, one run.

    python bench/finetune.py                                  # tiny shape on CPU
    python bench/finetune.py --shape llama3-1b --batch 4 --seq 2048      # the Llama-3.2-1B shape, one GPU

Both load the same random-weight Hugging Face directory (written once by cybertron's exporter), put rank-r
adapters on all seven projections (q, k, v, o, gate, up, down), train with AdamW on the same SFT-like batch
(the first half of each row is a prompt without loss) and clip gradients at 1.0. Each framework runs in its
own subprocess so peak memory is its own (CPU: peak resident set, imports included, and the part above the
process's size before the model was loaded; CUDA: max allocated). The pair runs --repeats times in
alternating order; the median tokens/s is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="a cybertron preset (tiny, llama3-1b, ...)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="runs of each framework, alternating")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--json-out", default="", help="append one JSON line per framework to this file")
    p.add_argument("--worker", choices=["cybertron", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def batch(vocab: int, args, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    labels = tokens.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half carries no loss
    return tokens.to(device), labels.to(device)


def ours(model_dir: str, args, device, autocast):
    from cybertron.finetune.lora import LoRASpec, apply_lora
    from cybertron.models.hf import load_hf_model
    from cybertron.train.optim import build_optimizer
    from cybertron.train.trainer import LanguageModelStep, Trainer

    model = load_hf_model(model_dir, device=device)
    apply_lora(model, LoRASpec(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS))
    opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.999), 1e-8)
    trainer = Trainer(model, opt, LanguageModelStep(), lambda s: 1e-4, grad_clip=1.0, autocast=autocast)
    tokens, labels = batch(model.config.vocab_size, args, device)
    mb = {"inputs": tokens[:, :-1], "labels": labels[:, 1:]}
    return lambda: trainer.train_step(0, [mb])


def peer(model_dir: str, args, device, autocast):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(device)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    tokens, labels = batch(model.config.vocab_size, args, device)
    inputs, targets = tokens[:, :-1], labels[:, :-1]  # HF shifts labels itself

    def step():
        with autocast():
            loss = model(input_ids=inputs, labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(args) -> None:
    import contextlib

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    before = rss_gib()
    step = (ours if args.worker == "cybertron" else peer)(args.model_dir, args, device, autocast)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else rss_gib()
    print(json.dumps({"tokens_per_s": args.batch * args.seq * args.steps / seconds, "peak_gib": peak,
                      "rss_before_model_gib": before}))


def make_model_dir(shape: str, out: Path, device: str) -> None:
    from cybertron.models.hf import save_hf_model
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config

    cfg = preset_config(shape)
    model = build_model(cfg, device=device, seed=0)
    save_hf_model(model.state_dict(), cfg, out)


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_model_dir(args.shape, Path(tmp) / "hf", args.device)
        results: dict[str, list[dict]] = {"cybertron": [], "peft": []}
        order = ["cybertron", "peft"]
        for r in range(args.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(Path(tmp) / "hf"),
                       *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k not in ("worker", "model_dir") and v is not None]]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"shape={args.shape} batch={args.batch} seq={args.seq} rank={args.rank} device={args.device} "
          f"threads={args.threads} torch={torch.__version__}")
    rates = {}
    for name, runs in results.items():
        rates[name] = statistics.median(r["tokens_per_s"] for r in runs)
        peak = max(r["peak_gib"] for r in runs)
        base = min(r["rss_before_model_gib"] for r in runs)
        extra = f" (process before the model: {base:.2f} GiB)" if args.device == "cpu" else ""
        label = "transformers+peft" if name == "peft" else name
        print(f"{label:<18} {rates[name]:>10,.0f} tokens/s   peak memory {peak:.2f} GiB{extra}")
    print(f"ratio cybertron / transformers+peft = {rates['cybertron'] / rates['peft']:.3f}")
    if args.json_out:
        write_json(args, results)


def write_json(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    from results_jsonl import append_rows

    noise = f"median of {args.repeats} runs (alternating order) of {args.steps} steps after {args.warmup} warm-up"
    append_rows(args.json_out, "finetune", args.device, [
        {"runner": "transformers+peft" if name == "peft" else name, "shape": args.shape, "batch": args.batch,
         "seq": args.seq, "rank": args.rank, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
         "peak_mem_gib": max(r["peak_gib"] for r in runs),
         "peak_mem_kind": "max allocated" if args.device.startswith("cuda") else "process peak RSS",
         "noise": noise} for name, runs in results.items()])


if __name__ == "__main__":
    main()

"""Training throughput: cybertron's trainer vs `transformers` LlamaForCausalLM (and, with --torchtitan,
torchtitan 0.2.2), same shape, same batch, same AdamW, in one benchmark run on the same device.

    python bench/train_throughput.py                      # tiny shape on CPU
    python bench/train_throughput.py --shape llama3-1b --batch 4 --seq 2048 --torchtitan   # one GPU
    python bench/train_throughput.py --shape llama3-1b --batch 4 --seq 2048 --fp8 tensorwise,rowwise
    python bench/train_throughput.py --shape llama3-1b --batch 4 --seq 2048 --loss-curve 300

cybertron runs as `cybertron train` builds it: a TrainConfig (model.preset = --shape, data.seq_len,
train.global_batch_size, train.compile, train.fp8) through pretrain.py's build_model_config, build_weights
and build_trainer. Each side is measured eager and with torch.compile (cybertron: `train.compile`, forward +
loss; transformers: torch.compile of the model, its fastest documented setup; torchtitan: --compile.enable,
per-block model + loss). --fp8 adds `cybertron+compile+fp8-RECIPE` (torchao float8, train.fp8) and, with
--torchtitan, torchtitan's own float8 converter with the same recipe (output head skipped on both).

On CUDA the runners go one after another (each builds, warms up, runs its rounds, is freed), so each one's
peak memory (torch.cuda.max_memory_allocated, reset when it starts) is its own; on CPU they interleave
round by round so machine noise hits all of them (--interleave / --sequential override). torchtitan runs as
a subprocess (bench/torchtitan_llama3_1b.py) and reports its own tokens/s and peak *reserved* memory; its
MFU here uses cybertron's FLOP count so the column compares the same work.

--loss-curve N trains bf16 and each fp8 recipe for N steps on the same real text (the stdlib corpus
through cybertron's data pipeline, same order) and prints the largest relative gap of the smoothed loss."""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cybertron.config import TrainConfig
from cybertron.models.hf import config_to_hf
from cybertron.models.presets import preset_config
from cybertron.parallel.runtime import layout_dims
from cybertron.pretrain import (
    build_data,
    build_model_config,
    build_trainer,
    build_weights,
    split_micro_batches,
    validate,
)
from cybertron.train.float8 import FP8_RECIPES, float8_support_error
from cybertron.train.metrics import device_peak_flops, flops_per_token
from cybertron.train.optim import build_optimizer
from cybertron.train.precision import autocast, resolve_dtype

Step = Callable[[torch.Tensor, torch.Tensor], None]
BENCH = Path(__file__).resolve().parent
# cybertron preset -> torchtitan llama3 flavor ("1B" and "tiny" are registered by torchtitan_llama3_1b.py).
TORCHTITAN_FLAVORS = {"llama3-1b": "1B", "llama3-8b": "8B", "tiny": "tiny"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true",
                   help="measure eager only (cybertron without train.compile, transformers and torchtitan uncompiled)")
    p.add_argument("--fused-loss", action="store_true",
                   help="add cybertron[+compile]+fusedloss: train.fused_loss (no full logits)")
    p.add_argument("--fp8", default="", help="comma-separated train.fp8 recipes to add: tensorwise, rowwise")
    p.add_argument("--only", default="", help="comma-separated runner names to keep (e.g. cybertron+compile); "
                                             "empty = all, 'none' = no in-process runner (--torchtitan alone)")
    p.add_argument("--torchtitan", action="store_true", help="add torchtitan 0.2.2 (needs CUDA and its wheels)")
    p.add_argument("--torchtitan-python", default=sys.executable, help="the Python that has torchtitan installed")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                       help="alternate runners round by round (default on CPU; peak memory not reported)")
    order.add_argument("--sequential", dest="interleave", action="store_false",
                       help="one runner at a time, freed after (default on CUDA)")
    p.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                   help="instead of timing: train bf16 vs fp8 for STEPS steps on real text, compare losses")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of --loss-curve runs")
    p.add_argument("--curves-dir", default="", help="--loss-curve: save each recipe's losses here and reuse "
                                                    "saved ones with the same settings (split long runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    p.add_argument("--json-out", default="", help="append one JSON line per runner to this file "
                                                  "(bench/results_jsonl.py: the fields every line has)")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="the device's peak dense bf16 FLOP/s for MFU (0 = cybertron's table: H100/H200 989e12)")
    args = p.parse_args()
    args.fp8 = [r.strip() for r in args.fp8.split(",") if r.strip()]
    bad = [r for r in args.fp8 if r not in FP8_RECIPES[1:]]
    if bad:
        p.error(f"--fp8 takes {', '.join(FP8_RECIPES[1:])}; got {', '.join(bad)}")
    if args.interleave is None:
        args.interleave = not args.device.startswith("cuda")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cybertron_config(args: argparse.Namespace, compile: bool, fp8: str = "none",
                     fused_loss: bool = False) -> TrainConfig:
    """The TrainConfig `cybertron train --model.preset SHAPE ...` would hold for this benchmark."""
    cfg = TrainConfig()
    cfg.model.preset = args.shape
    cfg.model.vocab_size = preset_config(args.shape).vocab_size  # the preset's shape, whatever the tokenizer
    cfg.data.seq_len = args.seq
    cfg.train.global_batch_size = args.batch
    cfg.train.compile = compile
    cfg.train.fp8 = fp8
    cfg.train.fused_loss = fused_loss
    cfg.train.device = args.device
    cfg.train.lr, cfg.train.warmup_steps = args.lr, 0
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """`cybertron train`'s validation; on CPU fp8 is let through (torch emulates the float8 GEMM there), so the
    code path runs in CI, though its speed means nothing."""
    if cfg.train.fp8 != "none" and torch.device(cfg.train.device).type == "cpu":
        fp8, cfg.train.fp8 = cfg.train.fp8, "none"
        validate(cfg)
        cfg.train.fp8 = fp8
    else:
        validate(cfg)


def build_cybertron(cfg: TrainConfig):
    """(trainer, model config) exactly as pretrain.py builds them on one process."""
    check_config(cfg)
    device = torch.device(cfg.train.device)
    dtype_name = resolve_dtype(cfg.train.dtype, device)
    model_cfg = build_model_config(cfg, cfg.model.vocab_size)
    model = build_weights(cfg, model_cfg, device)
    trainer, _ = build_trainer(cfg, model, layout_dims(cfg, 1), None, dtype_name, device)
    return trainer, model_cfg


def make_ours(cfg: TrainConfig) -> Step:
    trainer, _ = build_cybertron(cfg)
    device = torch.device(cfg.train.device)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        trainer.train_step(0, split_micro_batches(inputs, targets, cfg.train.micro_batch_size, device))

    return step


def make_peer(cfg: TrainConfig, compiled: bool) -> Step:
    import transformers

    device = torch.device(cfg.train.device)
    model_cfg = build_model_config(cfg, cfg.model.vocab_size)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(model_cfg).items()
                                         if k not in ("architectures", "model_type")})
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg)
    ours = build_weights(cfg, model_cfg, device)  # the same initial weights as cybertron's runners
    missing = model.load_state_dict({("model." + k if not k.startswith("lm_head") else k): v
                                     for k, v in ours.state_dict().items()}, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    del ours
    model.train()
    # Same optimizer as ours: AdamW, same decay groups, fused when ours is.
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)
    forward = torch.compile(model) if compiled else model
    dtype_name = resolve_dtype(cfg.train.dtype, device)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(dtype_name, device):
            # labels=targets with shifting disabled is not an HF option; pass the unshifted sequence instead,
            # the same number of predicted tokens (T-1 vs T) within 1/T.
            loss = forward(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@dataclass
class Result:
    tokens_per_s: float
    peak_gib: float | None = None
    note: str = ""


def runners(args: argparse.Namespace) -> dict[str, Callable[[], Step]]:
    """Name -> a function that builds the runner (built lazily, so sequential mode holds one at a time)."""
    out: dict[str, Callable[[], Step]] = {
        "cybertron": lambda: make_ours(cybertron_config(args, False)),
        "transformers": lambda: make_peer(cybertron_config(args, False), False),
    }
    if not args.no_compile:
        out["cybertron+compile"] = lambda: make_ours(cybertron_config(args, True))
        out["transformers+compile"] = lambda: make_peer(cybertron_config(args, True), True)
    compiled = not args.no_compile  # fp8 is only fast compiled (the casts fuse); eager keeps a debug path
    if args.fused_loss:  # train.fused_loss: head + loss chunk by chunk, no full logits
        out[f"cybertron{'+compile' if compiled else ''}+fusedloss"] = \
            lambda: make_ours(cybertron_config(args, compiled, fused_loss=True))
    for recipe in fp8_recipes(args):
        name = f"cybertron{'+compile' if compiled else ''}+fp8-{recipe}"
        out[name] = lambda r=recipe: make_ours(cybertron_config(args, compiled, r))
    if args.only:  # split a long GPU benchmark over several commands
        keep = set(args.only.split(","))
        out = {name: build for name, build in out.items() if name in keep}
    return out


def fp8_recipes(args: argparse.Namespace) -> list[str]:
    """The --fp8 recipes this device can run: a CUDA GPU with FP8 tensor cores, or CPU (emulated, which keeps
    the code path tested but says nothing about speed)."""
    device = torch.device(args.device)
    problem = float8_support_error(device) if device.type == "cuda" else None
    if args.fp8 and problem:
        print(f"skipping --fp8: {problem} (needs compute capability >= 8.9)", flush=True)
        return []
    if args.fp8 and device.type == "cpu":
        print("fp8 on CPU: torch emulates the float8 GEMM; those rows test the code path, not speed", flush=True)
    return args.fp8


def timed_round(step: Step, inputs: torch.Tensor, targets: torch.Tensor, n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step(inputs, targets)
    sync(device)
    return time.perf_counter() - start


def release(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks so the next runner starts from an empty device."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_sequential(args, builders, inputs, targets, device) -> dict[str, Result]:
    results = {}
    for name, build in builders.items():
        release(device)
        start = time.perf_counter()
        step = build()
        # This runner's peak: its resident weights plus optimizer state and activations, nothing else's (reset
        # after building, so the transformers peer's temporary copy of cybertron's initial weights is not in it).
        reset_peak(device)
        timed_round(step, inputs, targets, args.warmup, device)
        print(f"warmup {name}: {time.perf_counter() - start:.1f}s", flush=True)
        times = [timed_round(step, inputs, targets, args.steps, device) for _ in range(args.rounds)]
        results[name] = Result(args.batch * args.seq * args.steps / statistics.median(times), peak_gib(device))
        del step
    release(device)
    return results


def run_interleaved(args, builders, inputs, targets, device) -> dict[str, Result]:
    steps = {}
    for name, build in builders.items():
        start = time.perf_counter()
        steps[name] = build()
        timed_round(steps[name], inputs, targets, args.warmup, device)
        print(f"warmup {name}: {time.perf_counter() - start:.1f}s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed_round(step, inputs, targets, args.steps, device))
    # Peak memory is not per runner here (all of them are resident at once), so it is not reported.
    return {name: Result(args.batch * args.seq * args.steps / statistics.median(t)) for name, t in times.items()}


def torchtitan_command(args: argparse.Namespace, workdir: Path, compile: bool, fp8: str) -> list[str]:
    flags = ["--model.flavor", TORCHTITAN_FLAVORS[args.shape], "--training.local_batch_size", str(args.batch),
             "--training.seq_len", str(args.seq), "--training.steps", str(args.warmup + args.rounds * args.steps),
             "--metrics.log_freq", str(args.steps), "--metrics.disable_color_printing",
             "--activation_checkpoint.mode", "none", "--lr_scheduler.warmup_steps", "1",
             "--job.dump_folder", str(workdir / "outputs")]
    if compile:
        flags.append("--compile.enable")
    if fp8 != "none":  # the same recipe and the same skipped output head as train.fp8
        flags += ["--model.converters", "quantize.linear.float8",
                  "--quantize.linear.float8.recipe_name", fp8, "--quantize.linear.float8.filter_fqns", "output"]
    return [args.torchtitan_python, str(BENCH / "torchtitan_llama3_1b.py"), "--workdir", str(workdir), "--", *flags]


# torchtitan's metrics line: "step: 10  loss:  7.12345  grad_norm: ...  memory: 12.34GiB(15.60%)  tps: 12,345 ..."
_TITAN_LINE = re.compile(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+).*?mfu:\s*([\d.]+)%")


def parse_torchtitan_log(text: str, first_timed_step: int) -> Result:
    """Median tokens/s over the logged intervals after warmup, and the largest peak reserved memory."""
    rows = [(int(s), float(mem), float(tps.replace(",", "")), float(mfu))
            for s, mem, tps, mfu in _TITAN_LINE.findall(text)]
    timed = [r for r in rows if r[0] >= first_timed_step]
    if not timed:
        raise RuntimeError("no torchtitan metrics lines after warmup in its log")
    return Result(statistics.median(r[2] for r in timed), max(r[1] for r in rows),
                  f"reserved; torchtitan's own MFU {statistics.median(r[3] for r in timed):.1f}%")


def run_torchtitan(args: argparse.Namespace, device: torch.device) -> dict[str, Result]:
    if device.type != "cuda":  # torchtitan 0.2.2's Trainer calls torch.cuda.set_device whatever the machine
        print("skipping torchtitan: it needs a CUDA device")
        return {}
    if args.shape not in TORCHTITAN_FLAVORS:
        print(f"skipping torchtitan: no flavor for --shape {args.shape} ({', '.join(TORCHTITAN_FLAVORS)})")
        return {}
    variants = [("torchtitan", False, "none")] if args.no_compile else [("torchtitan+compile", True, "none")]
    compiled = "" if args.no_compile else "+compile"
    variants += [(f"torchtitan{compiled}+fp8-{r}", not args.no_compile, r) for r in fp8_recipes(args)]
    results = {}
    workdir = Path(tempfile.mkdtemp(prefix="torchtitan-bench-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, compile, fp8 in variants:
        release(device)  # give this process's cached GPU memory back before torchtitan starts
        start = time.perf_counter()
        proc = subprocess.run(torchtitan_command(args, workdir, compile, fp8), env=env, capture_output=True,
                              text=True)
        log = proc.stdout + proc.stderr
        (workdir / f"{name}.log").write_text(log)
        if proc.returncode != 0:
            print(f"{name} failed (exit {proc.returncode}); log {workdir / f'{name}.log'}:\n{log[-2000:]}")
            continue
        results[name] = parse_torchtitan_log(log, args.warmup + args.steps)
        print(f"ran {name}: {time.perf_counter() - start:.1f}s (log {workdir / f'{name}.log'})", flush=True)
    return results


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loss_curve:
        loss_curve(args)
        return
    device = torch.device(args.device)
    cfg = preset_config(args.shape)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    run = run_interleaved if args.interleave else run_sequential
    results = run(args, runners(args), inputs, targets, device)
    if args.torchtitan:
        results.update(run_torchtitan(args, device))
    report(args, device, results)


def report(args: argparse.Namespace, device: torch.device, results: dict[str, Result]) -> None:
    peak = args.peak_flops or device_peak_flops(device)
    fpt = flops_per_token(build_model_config(cybertron_config(args, False), preset_config(args.shape).vocab_size),
                          args.seq)
    print(f"\nshape={args.shape} batch={args.batch} seq={args.seq} device={device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"torch={torch.__version__} threads={torch.get_num_threads()} "
          f"order={'interleaved' if args.interleave else 'sequential'}")
    print(f"{'runner':<34} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9}")
    for name, r in results.items():
        mfu = f"{100 * r.tokens_per_s * fpt / peak:.1f}%" if peak else "n/a"
        mem = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "n/a"
        print(f"{name:<34} {r.tokens_per_s:>12,.0f} {mfu:>7} {mem:>9}  {r.note}".rstrip())
    rate = {name: r.tokens_per_s for name, r in results.items()}
    print()
    for label, ours, peer in ratio_pairs(rate):
        print(f"ratio {label}: {ours} / {peer} = {rate[ours] / rate[peer]:.3f}")
    if args.json_out:
        write_json(args, device, results, fpt, peak)


def write_json(args: argparse.Namespace, device: torch.device, results: dict[str, Result], flops_per_tok: float,
               peak: float | None) -> None:
    from results_jsonl import append_rows, process_peak_gib

    noise = f"median of {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps"
    rows = []
    for name, r in results.items():
        if r.peak_gib is not None:
            mem, kind = r.peak_gib, "reserved" if name.startswith("torchtitan") else "max allocated"
        else:  # CPU, or runners resident together: the whole process's peak, an upper bound for each
            mem, kind = process_peak_gib(), "process peak RSS"
        rows.append({"runner": name, "shape": args.shape, "batch": args.batch, "seq": args.seq,
                     "tokens_per_s": r.tokens_per_s, "mfu": r.tokens_per_s * flops_per_tok / peak if peak else None,
                     "peak_flops": peak, "flops_per_token": flops_per_tok, "peak_mem_gib": mem,
                     "peak_mem_kind": kind, "noise": noise, "note": r.note})
    append_rows(args.json_out, "train_throughput", device, rows)


def ratio_pairs(rate: dict[str, float]) -> list[tuple[str, str, str]]:
    """(label, numerator, denominator) for the comparisons the issue asks for, where both sides ran."""
    best = lambda prefix, fp8: max((k for k in rate if k.startswith(prefix) and ("fp8" in k) == fp8),
                                   key=rate.get, default=None)
    pairs = [("best bf16 cybertron / best transformers", best("cybertron", False), best("transformers", False)),
             ("eager cybertron / eager transformers", "cybertron", "transformers"),
             ("best bf16 cybertron / torchtitan", best("cybertron", False), best("torchtitan", False)),
             ("best fp8 cybertron / best fp8 torchtitan", best("cybertron", True), best("torchtitan", True)),
             ("fp8 speed-up, cybertron", best("cybertron", True), best("cybertron", False)),
             ("fp8 speed-up, torchtitan", best("torchtitan", True), best("torchtitan", False))]
    return [(label, a, b) for label, a, b in pairs if a in rate and b in rate]


def loss_curve(args: argparse.Namespace) -> None:
    """bf16 vs each fp8 recipe, N steps each on the same batches; the largest relative gap of smoothed losses."""
    device = torch.device(args.device)
    recipes = ["none", *(fp8_recipes(args) if args.fp8 else fp8_recipes(_with_fp8(args)))]
    base = cybertron_config(args, not args.no_compile)
    base.train.steps, base.train.warmup_steps = args.loss_curve, max(1, args.loss_curve // 20)
    data = build_data(base)  # the stdlib corpus and its BPE tokenizer, cached like `cybertron train`'s
    curves: dict[str, list[float]] = {}
    for recipe in recipes:
        saved = _curve_path(args, recipe)
        if saved is not None and saved.exists():
            curves[recipe] = json.loads(saved.read_text())
            print(f"{recipe:<10} {len(curves[recipe])} steps read from {saved}")
            continue
        release(device)
        cfg = cybertron_config(args, not args.no_compile, recipe)
        cfg.train.steps, cfg.train.warmup_steps = base.train.steps, base.train.warmup_steps
        trainer, _ = build_cybertron(cfg)
        loader = _loader(data, cfg)
        start, losses = time.perf_counter(), []
        for step in range(cfg.train.steps):
            inputs, targets = loader.next_batch()
            micro = split_micro_batches(inputs, targets, cfg.train.micro_batch_size, device)
            losses.append(trainer.train_step(step, micro).loss.item())
        curves[recipe] = losses
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(losses))
        print(f"{recipe:<10} {len(losses)} steps in {time.perf_counter() - start:.0f}s, loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}", flush=True)
        del trainer
    window = max(1, args.loss_curve // 20)
    reference = smooth(curves["none"], window)
    print(f"\nshape={args.shape} batch={args.batch} seq={args.seq} lr={args.lr} steps={args.loss_curve} "
          f"smoothing window={window} device={device}")
    for recipe, losses in curves.items():
        s = smooth(losses, window)
        gaps = [abs(a - b) / b for a, b in zip(s, reference)]
        late = gaps[len(gaps) // 10:]
        print(f"{recipe:<10} final smoothed loss {s[-1]:.4f}  max rel. diff vs bf16 {100 * max(gaps):.2f}% "
              f"(after the first 10%: {100 * max(late):.2f}%)")


def _curve_path(args: argparse.Namespace, recipe: str) -> Path | None:
    if not args.curves_dir:
        return None
    compiled = "eager" if args.no_compile else "compile"
    key = f"{args.shape}-b{args.batch}-s{args.seq}-lr{args.lr:g}-n{args.loss_curve}-{compiled}-{args.device}-{recipe}"
    return Path(args.curves_dir) / f"{key}.json"


def _with_fp8(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "fp8": list(FP8_RECIPES[1:])})


def _loader(data, cfg: TrainConfig):
    from cybertron.data.loader import PackedLoader

    return PackedLoader(data.shards.train, cfg.data.seq_len, cfg.train.global_batch_size, seed=cfg.train.seed)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


if __name__ == "__main__":
    main()

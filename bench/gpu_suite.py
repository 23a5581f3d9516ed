"""One GPU lease measures everything: the GPU tests and every GPU figure in about 8 minutes, one command.

    bash bench/gpu_suite.sh                       # on the GPU machine (installs the carried wheels, then this)
    python bench/gpu_suite.py [--out DIR]         # the same without the wheel install
    python bench/gpu_suite.py --dry-run --out /tmp/x   # the same code paths at tiny shapes on CPU (the tests do)

Steps, in order; each command runs as its own subprocess (its own process group) under a time limit, the
smaller of its own cap and what is left of its step's budget, so a hang or a crash costs that command only:

1. tests, 90 s: `pytest -m gpu` over tests/.
2. train, 180 s: bench/train_throughput.py at the Llama-3.2-1B shape, batch 4 x seq 2048, bf16 autocast, one
   process per runner: cybertron eager, +compile, transformers+compile, cybertron+compile+fusedloss,
   +compile+fp8-tensorwise, then torchtitan 0.2.2 +compile when it is importable. Noise: the median of 3
   rounds of 3 steps after 2 warm-up steps (compilation happens in the warm-up).
3. decode, 110 s: bench/decode.py at batch 1 and 32 concurrent, prompt 128, 128 new tokens, cybertron's
   engine (attention over the block table) vs transformers generate with the static cache and its own
   torch.compile of the decoding step (CUDA graphs). Noise: the best of 3 rounds after 1 warm-up round.
4. finetune, 45 s: bench/finetune.py, LoRA rank 16 on all seven projections, batch 4 x seq 2048, vs
   transformers + peft. Noise: 5 steps after 2 warm-up steps, one run of each (no repeat fits).
5. dpo, 55 s: bench/dpo.py, full-weight DPO, 8 pairs of 2 x 513 tokens per step, vs TRL's DPOTrainer when
   it is importable. Noise: 4 timed steps after 2, one run of each.

The budgets add up to 480 s; seconds a step leaves unused go to the next. They are estimates made without a
GPU (compilation dominates the training step):
the summary prints each command's seconds, so the first session on a GPU can move them with --budget.
A command that outruns its limit is killed with its children and reported as `timeout` in the summary.

Writes, into --out (default bench/results; on the device tool give `--out $OUT`, which comes back):
- `<UTC date>-<device>.jsonl`: one JSON line per figure (bench/results_jsonl.py's REQUIRED fields: date,
  device from torch.cuda.get_device_name, torch, bench, runner, shape, tokens_per_s, peak_mem_gib, command; the
  training lines add mfu against the device's peak dense bf16 FLOP/s, 989e12 for both the H100 SXM and the H200
  (the same Hopper tensor cores; the H200 differs in memory), and the noise bound of each figure);
- `<UTC date>-<device>.log`: every command's full output, one after another;
- `<UTC date>-<device>.summary.json`: each command's status (ok / failed / timeout / skipped) and seconds.
The exit status is 0 only when every command succeeded.

Offline: the GPU machine has no network. Its image holds torch 2.11, transformers, peft, accelerate, pytest,
tokenizers, pandas and pyarrow; `bash bench/gpu_wheels.sh .whl` (here, with network) downloads the rest:
torchao (train.fp8), torchtitan 0.2.2 and its dependencies, and TRL with datasets, about 7 MB in all, well
inside the device tool's 64 MiB: add `/.whl/` to .git/info/exclude and pass `carry=[".whl"]`; gpu_suite.sh
installs them into /tmp/site. A step whose peer is missing runs without it (torchtitan, TRL) and says so."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from results_jsonl import results_path  # noqa: E402

STEPS = ("tests", "train", "decode", "finetune", "dpo")
BUDGET_S = {"tests": 90, "train": 180, "decode": 110, "finetune": 45, "dpo": 55}
DRY_RUN_BUDGET_S = 900  # per step on a busy 2-core CPU: the dry run checks code paths, not time


@dataclass
class Command:
    """One subprocess: its name in the summary, its argv and its own cap in seconds."""

    name: str
    argv: list[str]
    cap_s: float


@dataclass
class Outcome:
    step: str
    name: str
    status: str  # ok, failed (exit code), timeout, skipped (no budget left)
    seconds: float
    command: str


def python(script: str, *flags: str) -> list[str]:
    """A bench run from the repository root, so the command its JSON lines record can be typed again there."""
    return [sys.executable, f"bench/{script}", *flags]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tests_commands(dry_run: bool) -> list[Command]:
    # addopts deselect gpu tests; a later -m wins. -rA lists every outcome at the end, -v each as it finishes
    # (so a timeout's log still says which passed).
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rA", "tests"]
    return [Command("pytest -m gpu", argv + (["--collect-only", "-q"] if dry_run else []), 90)]


def train_commands(dry_run: bool, jsonl: Path) -> list[Command]:
    """One process per runner, cheapest and most wanted first, so the budget runs out on the extras."""
    if dry_run:  # compile off: inductor's CPU compile alone would take minutes; names lose "+compile"
        shape = ["--shape", "tiny", "--batch", "1", "--seq", "32", "--warmup", "1", "--steps", "1", "--rounds", "1",
                 "--no-compile", "--device", "cpu", "--peak-flops", "1e12"]  # a nominal peak: MFU's code path
    else:
        shape = ["--shape", "llama3-1b", "--batch", "4", "--seq", "2048", "--warmup", "2", "--steps", "3",
                 "--rounds", "3"]
    common = [*shape, "--sequential", "--fused-loss", "--fp8", "tensorwise", "--json-out", str(jsonl)]
    c = "" if dry_run else "+compile"
    runners = [("cybertron", 45), (f"cybertron{c}", 75), (f"transformers{c}", 75),
               (f"cybertron{c}+fusedloss", 60), (f"cybertron{c}+fp8-tensorwise", 75)]
    caps = dict(reversed(runners))  # the dry run's eager "cybertron" appears twice: keep its first place
    out = [Command(name, python("train_throughput.py", *common, "--only", name), caps[name])
           for name in dict.fromkeys(name for name, _ in runners)]
    if not dry_run and has("torchtitan"):  # torchtitan needs CUDA; its bf16 compiled run only, to fit
        titan = [flag for flag in common if flag not in ("--fused-loss", "--fp8", "tensorwise")]
        out.append(Command("torchtitan+compile", python("train_throughput.py", *titan, "--only", "none",
                                                        "--torchtitan"), 90))
    return out


def decode_commands(dry_run: bool, jsonl: Path) -> list[Command]:
    # The dry run's peer skips compilation (inductor on CPU would take minutes), as the training step's does.
    sizes = (["--shape", "tiny", "--device", "cpu", "--prompt-len", "8", "--new-tokens", "4", "--concurrency", "2",
              "--repeats", "1", "--hf", "static"] if dry_run else
             ["--shape", "llama3-1b", "--prompt-len", "128", "--new-tokens", "128", "--concurrency", "32",
              "--repeats", "3", "--hf", "static-compiled"])
    return [Command("decode", python("decode.py", *sizes, "--json-out", str(jsonl)), 110)]


def finetune_commands(dry_run: bool, jsonl: Path) -> list[Command]:
    sizes = (["--shape", "tiny", "--device", "cpu", "--batch", "1", "--seq", "32", "--steps", "1", "--warmup", "1"]
             if dry_run else ["--shape", "llama3-1b", "--batch", "4", "--seq", "2048", "--steps", "5", "--warmup", "2"])
    return [Command("finetune lora", python("finetune.py", *sizes, "--repeats", "1", "--json-out", str(jsonl)), 45)]


def dpo_commands(dry_run: bool, jsonl: Path) -> list[Command]:
    frameworks = "cybertron,trl" if has("trl") else "cybertron"  # TRL travels as a wheel; without it, ours alone
    sizes = (["--device", "cpu", "--pairs", "8", "--batch", "2", "--steps", "2", "--warmup", "1",
              "--prompt-words", "4", "--response-words", "4"] if dry_run else
             ["--shape", "llama3-1b", "--device", "cuda", "--pairs", "64", "--batch", "8", "--steps", "6",
              "--warmup", "2", "--prompt-words", "256", "--response-words", "256"])
    return [Command(f"dpo full ({frameworks})", python("dpo.py", *sizes, "--repeats", "1", "--frameworks", frameworks,
                                                       "--json-out", str(jsonl)), 55)]


def plan(step: str, dry_run: bool, jsonl: Path) -> list[Command]:
    if step == "tests":
        return tests_commands(dry_run)
    build = {"train": train_commands, "decode": decode_commands, "finetune": finetune_commands, "dpo": dpo_commands}
    return build[step](dry_run, jsonl)


def run_command(cmd: Command, limit_s: float, log: Path, env: dict[str, str]) -> tuple[str, float]:
    """Run in its own process group so a timeout also ends the workers and peers it started."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n===== {cmd.name} (limit {limit_s:.0f} s): {' '.join(cmd.argv)}\n")
        f.flush()
        proc = subprocess.Popen(cmd.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
        seconds = time.perf_counter() - start
        f.write(f"===== {cmd.name}: {status} after {seconds:.1f} s\n")
    return status, seconds


def run_step(step: str, commands: list[Command], budget_s: float, log: Path, env: dict[str, str],
             min_s: float = 5.0) -> list[Outcome]:
    """Commands in order, each limited to min(its cap, the step's budget left); skipped once under min_s."""
    outcomes, deadline = [], time.perf_counter() + budget_s
    for cmd in commands:
        limit = min(cmd.cap_s, deadline - time.perf_counter())
        if limit < min_s:
            outcomes.append(Outcome(step, cmd.name, "skipped (no budget left)", 0.0, " ".join(cmd.argv)))
        else:
            status, seconds = run_command(cmd, limit, log, env)
            outcomes.append(Outcome(step, cmd.name, status, seconds, " ".join(cmd.argv)))
        print(f"[{step}] {cmd.name}: {outcomes[-1].status} ({outcomes[-1].seconds:.1f} s)", flush=True)
    return outcomes


def run_steps(steps: list[tuple[str, list[Command], float]], log: Path, env: dict[str, str]) -> list[Outcome]:
    """Each step with its budget plus what the steps before it left unused: the total stays the sum of the
    budgets, and a quick step (the tests, say) leaves time to the training runners after it."""
    outcomes: list[Outcome] = []
    spare = 0.0
    for step, commands, budget in steps:
        if spare >= 1:
            print(f"[{step}] budget {budget:.0f} s + {spare:.0f} s left by the steps before", flush=True)
        budget += spare
        start = time.perf_counter()
        outcomes += run_step(step, commands, budget, log, env)
        spare = max(0.0, budget - (time.perf_counter() - start))
    return outcomes


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results"), help="folder for the .jsonl, .log and .summary.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: the code paths, not the figures")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps ({', '.join(STEPS)})")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help="override a step's budget (repeatable)")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    bad = [s for s in args.only if s not in STEPS]
    if bad:
        p.error(f"--only takes {', '.join(STEPS)}; got {', '.join(bad)}")
    args.budgets = dict.fromkeys(STEPS, DRY_RUN_BUDGET_S) if args.dry_run else dict(BUDGET_S)
    for item in args.budget:
        step, _, seconds = item.partition("=")
        if step not in STEPS or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget takes STEP=SECONDS with STEP one of {', '.join(STEPS)}; got {item!r}")
        args.budgets[step] = float(seconds)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run for the CPU check of the code paths", file=sys.stderr)
        return 2
    jsonl = results_path(args.out, device)
    log, summary = jsonl.with_suffix(".log"), jsonl.with_suffix(".summary.json")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if args.dry_run:  # the benches pick CUDA when they see it; the dry run is the CPU path wherever it runs
        env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"{'dry run (CPU, tiny shapes)' if args.dry_run else torch.cuda.get_device_name()}: steps "
          f"{', '.join(f'{s} {args.budgets[s]:.0f} s' for s in args.only)}; writing {jsonl}", flush=True)
    for peer, effect in (("torchtitan", "train runs without it"), ("trl", "dpo runs cybertron alone"),
                         ("torchao", "the fp8 training runner will fail")):
        if not has(peer):
            print(f"{peer} is not importable: {effect} (bench/gpu_wheels.sh fetches it)", flush=True)
    steps = [(step, plan(step, args.dry_run, jsonl), args.budgets[step]) for step in args.only]
    if args.dry_run:  # the caps are sized for a GPU; a busy CPU gets the step's whole budget per command
        for _, commands, budget in steps:
            for cmd in commands:
                cmd.cap_s = budget
    outcomes = run_steps(steps, log, env)
    summary.write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")
    print(f"\n{'step':<9} {'command':<34} {'status':<26} seconds")
    for o in outcomes:
        print(f"{o.step:<9} {o.name:<34} {o.status:<26} {o.seconds:7.1f}")
    print(f"figures: {jsonl}\nfull output: {log}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

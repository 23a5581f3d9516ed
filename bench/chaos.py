"""Chaos test of the training driver: faults on purpose, as a user's cluster would make them.

1. K SIGKILLs of a random rank of a 2-rank gloo run (`cybertron train --nproc 2 --max-restarts K`), some
   while a checkpoint is being written, some between saves: torchrun's elastic agent restarts the ranks, they
   resume from the newest complete checkpoint, and the final per-step losses must equal those of the same run
   never interrupted.
2. A NaN injected into the loss at a random step of a one-process run: the step is skipped (weights and
   optimizer state unchanged), logged, and the run finishes with finite weights.

    python bench/chaos.py [--kills 3] [--steps 30] [--seed 0]

Prints one JSON line per part; bench/RESULTS.md records them."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def corpus(root: Path) -> Path:
    """About 1 MB of Python from the standard library: enough text for a 512-token BPE and 30 steps."""
    out = root / "corpus"
    out.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "dataclasses.py", "difflib.py", "textwrap.py", "typing.py", "inspect.py"):
        (out / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return out


def train_args(data: Path, cache: Path, steps: int) -> list[str]:
    return ["train", "--data.path", str(data), "--data.cache_dir", str(cache), "--data.vocab_size", "512",
            "--data.seq_len", "64", "--model.preset", "debug", "--train.global_batch_size", "8",
            "--train.micro_batch_size", "2", "--train.warmup_steps", "2", "--eval.every", "0", "--log.every", "1",
            "--log.progress", "lines", "--log.tensorboard", "false", "--checkpoint.every", "3",
            "--steps", str(steps)]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of a step winning (a resumed run logs the repeated steps again)."""
    out: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rank_pid(launcher: int, rank: int) -> int | None:
    for pid in children(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def saving(run_dir: Path) -> bool:
    """A checkpoint is being written: its temporary directory exists."""
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp") for p in root.iterdir())


def kill_run(args: list[str], out: Path, kills: int, steps: int, rng: random.Random) -> dict:
    launcher = subprocess.Popen([sys.executable, "-m", "cybertron", *args, "--nproc", "2", "--out", str(out),
                                 "--max-restarts", str(kills)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env())
    log = []
    try:
        for k in range(kills):
            during_save = rng.random() < 0.5
            # spread the kills over the run: kill k waits for a step past the previous kill's
            target = (k + 1) * steps // (kills + 2) + rng.randint(0, 2)
            deadline = time.monotonic() + 600
            while True:
                if launcher.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the run ended before kill {k + 1}: {launcher.stderr.read()[-2000:]}")
                reached = max(losses(out), default=0) >= target
                if reached and (not during_save or saving(out)):
                    break
                time.sleep(0.005)
            victim_rank = rng.randint(0, 1)
            pid = rank_pid(launcher.pid, victim_rank)
            if pid is None:
                continue
            was_saving = saving(out)
            os.kill(pid, signal.SIGKILL)
            log.append({"kill": k + 1, "rank": victim_rank, "after_step": max(losses(out), default=0),
                        "during_save": was_saving})
            # the agent restarts the group; wait until the restarted ranks have logged a step again
            time.sleep(3)
        stdout, stderr = launcher.communicate(timeout=900)
    finally:
        launcher.kill()
    return {"returncode": launcher.returncode, "kills": log, "restarts": stdout.count("resuming from"),
            "stderr_tail": stderr[-500:] if launcher.returncode else ""}


def nan_run(steps: int, rng: random.Random, root: Path, data: Path, cache: Path) -> dict:
    """One process, in-process: the step function multiplies the loss of one step's batch by NaN."""
    from cybertron.config import TRAINING_SHORTCUTS, TrainConfig, parse_args
    from cybertron.pretrain import run_training
    from cybertron.train.trainer import LanguageModelStep

    poisoned = rng.randint(3, steps - 2)
    calls = {"n": 0}
    original = LanguageModelStep.__call__

    def poisoned_call(self, model, batch):  # counts training forwards: one micro-batch per step here
        loss, extra = original(self, model, batch)
        if not model.training:  # evaluation
            return loss, extra
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == poisoned else loss), extra

    cfg = parse_args([*train_args(data, cache, steps)[1:], "--train.micro_batch_size", "0", "--out",
                      str(root / "nan")], TrainConfig(), TRAINING_SHORTCUTS)
    LanguageModelStep.__call__ = poisoned_call
    try:
        finished = run_training(cfg, lambda run_dir: None)
    finally:
        LanguageModelStep.__call__ = original
    records = [json.loads(line) for line in (root / "nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if "skipped" in r]
    finite = all(torch.isfinite(p).all() for p in finished.model.parameters())
    return {"poisoned_step": poisoned, "skipped_steps": skipped, "weights_finite": bool(finite),
            "steps_logged": sorted(r["step"] for r in records if "loss" in r)[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, cache = corpus(root), root / "cache"
        args = train_args(data, cache, a.steps)
        start = time.perf_counter()
        reference = subprocess.run([sys.executable, "-m", "cybertron", *args, "--nproc", "2", "--out",
                                    str(root / "reference")], capture_output=True, text=True, env=env())
        if reference.returncode:
            print(reference.stderr[-3000:], file=sys.stderr)
            return 1
        chaos = kill_run(args, root / "chaos", a.kills, a.steps, rng)
        got, expected = losses(root / "chaos"), losses(root / "reference")
        equal = sum(got.get(s) == v for s, v in expected.items())
        print(json.dumps({"part": "kills", "seed": a.seed, "steps": a.steps, **chaos,
                          "steps_equal_bitwise": f"{equal}/{len(expected)}",
                          "max_abs_diff": max((abs(got[s] - v) for s, v in expected.items() if s in got),
                                              default=None),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        print(json.dumps({"part": "nan", "seed": a.seed, **nan_run(a.steps, rng, root, data, cache)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

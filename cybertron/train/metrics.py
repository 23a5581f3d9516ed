"""Throughput, MFU and memory; console progress (a bar on a terminal, plain lines otherwise), metrics.jsonl
and the experiment trackers it feeds (tracking.py)."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from cybertron.config import LogSection
from cybertron.models.config import ModelConfig
from cybertron.train.tracking import Tracker, open_trackers

# Dense bf16 peak FLOP/s by device-name fragment; MFU is null where the peak is unknown (e.g. CPUs).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (weights a token multiplies, head included) + attention's 12 x L x H x hd x T."""
    matmul_params = cfg.num_params(include_embedding=False, active=True)
    if cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * cfg.dim  # the tied head still multiplies
    hd = cfg.head_size
    if cfg.is_mla:  # q.k over nope + rope dims, attention x v over v_head_dim: their mean stands for hd
        hd = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * hd * seq_len


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA max allocated, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ProgressDisplay:
    """One updating line on a terminal; one line per log step otherwise."""

    def __init__(self, total_steps: int, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.total = total_steps
        self.bar = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self.start = time.perf_counter()

    def step(self, step: int, record: dict[str, Any]) -> None:
        text = (f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:,.0f} tok/s")
        if self.bar:
            frac = step / max(1, self.total)
            filled = int(24 * frac)
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(frac, 1e-9) - elapsed
            bar = "=" * filled + (">" if filled < 24 else "") + " " * (23 - filled)
            self.stream.write(f"\r[{bar}] {text} eta {_clock(eta)}  ")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.bar:
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds)) if math.isfinite(seconds) else 0
    return f"{seconds // 60}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes metrics.jsonl (one object per logged step / evaluation) and hands each record's numbers to the
    trackers of `log` (TensorBoard, wandb, MLflow: tracking.py).

    `resumed_at`: the step a resumed run goes on from; the records after it are dropped, so the file reads
    as one uninterrupted run. None, a new run: an old file (of a run that died before its first checkpoint,
    started again) is replaced, not appended to."""

    def __init__(self, run_dir: Path, display: ProgressDisplay | None, log: LogSection | None = None,
                 enabled: bool = True, resumed_at: int | None = None):
        self.enabled = enabled
        self.display = display
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[Tracker] = []
        self.dropped_lines = 0  # unreadable lines left out on resume (a write torn by a kill)
        # The highest step sent before a resume: a tracker that continues its run already holds the steps the
        # resumed run repeats (identically, from the checkpoint), and wandb refuses a step below its last one.
        self.sent_through = -1
        if not enabled:
            return
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
        else:
            self.sent_through = self.truncate_after(resumed_at)
        if log is not None:
            self.trackers = open_trackers(log, run_dir, resumed_at)

    def truncate_after(self, step: int) -> int:
        """Drop records of steps after `step`, and lines that do not parse: a kill during a write leaves a
        torn last line. Returns the highest step the file held before (-1: none)."""
        if not self.enabled or not self.path.exists():
            return -1
        kept, highest = [], -1
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.dropped_lines += bool(line.strip())
                continue
            if isinstance(record, dict):
                highest = max(highest, int(record.get("step", 0)))
                if record.get("step", 0) <= step:
                    kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        return highest

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        values = {k: float(v) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            if values and (step > self.sent_through or not tracker.continued):
                tracker.log(step, values)
        if self.display is not None and "loss" in record:
            self.display.step(record["step"], record)

    def close(self, ok: bool = True) -> None:
        """`ok`: the run finished (False: it stopped with an error; wandb and MLflow mark it failed)."""
        for tracker in self.trackers:
            tracker.close(ok)
        self.trackers = []

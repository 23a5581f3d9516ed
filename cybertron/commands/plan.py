"""`cybertron plan`: the parallel layouts of a model that fit a GPU's memory, with predicted memory per GPU
and a relative step time, best first (cybertron/plan/: the memory and time models and what they count).

    cybertron plan --model llama3-8b --gpu-memory 80GiB --world-size 8 --seq-len 8192
    cybertron plan --model ./hf_dir --gpu-memory 141GB --world-size 16 --seq-len 4096 --micro-batch 1,2 --json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import check_dtype, help_text, opt, parse_args, raise_first_failure
from cybertron.errors import UserError
from cybertron.models.config import ModelConfig
from cybertron.models.presets import PRESETS, preset_config
from cybertron.plan.memory import GPU_OVERHEAD, OPTIMIZER_BYTES
from cybertron.plan.planner import plan
from cybertron.plan.report import as_json, parse_bytes, table
from cybertron.plan.timing import Hardware

METHODS = ("pretrain", "full", "lora")
CHECKPOINTING = ("none", "full", "selective")


@dataclass
class PlanSection:
    model: str = opt("", "a preset name (llama3-8b, qwen2-7b, ...) or a Hugging Face model directory")
    gpu_memory: str = opt("80GiB", "memory of one GPU, e.g. 80GiB, 141GB")
    world_size: int = opt(8, "number of GPUs (ranks)")
    seq_len: int = opt(4096, "tokens per sequence")
    micro_batch: str = opt("1,2,4", "sequences per rank per forward to try, comma-separated")
    dtype: str = opt("bf16", "training precision: bf16 (autocast / FSDP2 bf16 gather) or fp32", dtype=True)
    optimizer: str = opt("adamw", "optimizer (cybertron trains with adamw)")
    method: str = opt("pretrain", "pretrain or full (all weights trained), lora (frozen base, adapters only)")
    activation_checkpoint: str = opt("none,full", "checkpointing modes to try: none, full, selective")
    all: bool = opt(False, "also list the layouts that do not fit (marked !)")
    json: bool = opt(False, "print JSON instead of the table")
    top: int = opt(20, "rows to print (0 = all)")
    tflops: float = opt(989.0 * 0.4, "achieved TFLOP/s per GPU for the time model")
    bandwidth: float = opt(200.0, "collective bandwidth per GPU in GB/s for the time model")
    overhead: str = opt(f"{GPU_OVERHEAD / 2**30:g}GiB", "fixed per-GPU memory (CUDA context, NCCL buffers)")


@dataclass
class PlanConfig:
    plan: PlanSection = field(default_factory=PlanSection)


SHORTCUTS = {f"--{name.replace('_', '-')}": f"plan.{name}" for name in PlanSection.__dataclass_fields__}


def load_model_config(source: str) -> ModelConfig:
    """A preset name or a Hugging Face directory (its config.json)."""
    if not source:
        raise UserError(f"--model is required: a preset ({', '.join(PRESETS)}) or a Hugging Face directory")
    if Path(source).is_dir():
        from cybertron.models.hf import read_hf_config

        cfg = read_hf_config(source)
    elif source in PRESETS:
        cfg = preset_config(source)
    else:
        raise UserError(f"--model {source!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    try:
        cfg.validate()
    except ValueError as err:
        raise UserError(str(err)) from err
    return cfg


def _int_list(key: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--{key} expects positive integers separated by commas, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(PlanConfig(), "plan", SHORTCUTS))
        return 0
    c = parse_args(argv, PlanConfig(), SHORTCUTS).plan
    modes = tuple(m.strip() for m in c.activation_checkpoint.split(",") if m.strip())
    raise_first_failure([
        (c.world_size >= 1, f"--world-size must be >= 1, got {c.world_size}"),
        (c.seq_len >= 1, f"--seq-len must be >= 1, got {c.seq_len}"),
        check_dtype("--dtype", c.dtype, ("bf16", "fp32")),
        (c.optimizer in OPTIMIZER_BYTES, f"--optimizer {c.optimizer!r}: cybertron trains with "
                                         f"{', '.join(OPTIMIZER_BYTES)}"),
        (c.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {c.method!r}"),
        (bool(modes) and set(modes) <= set(CHECKPOINTING),
         f"--activation-checkpoint takes {', '.join(CHECKPOINTING)} separated by commas, "
         f"got {c.activation_checkpoint!r}"),
        (c.tflops > 0 and c.bandwidth > 0, "--tflops and --bandwidth must be positive"),
    ])
    gpu_memory = parse_bytes(c.gpu_memory)
    overhead = parse_bytes(c.overhead, "--overhead", allow_zero=True)
    cfg = load_model_config(c.model)
    if c.seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {c.seq_len} is above the model's maximum sequence length {cfg.max_seq_len}")
    rows = plan(cfg, c.world_size, c.seq_len, gpu_memory, _int_list("micro-batch", c.micro_batch), c.dtype,
                c.optimizer, "full" if c.method == "pretrain" else c.method, modes, overhead,
                Hardware(c.tflops, c.bandwidth))
    shown = rows if c.all else [r for r in rows if r.fits]
    if c.json:
        print(as_json(shown[:c.top] if c.top else shown))
        return 0
    n = cfg.num_params()
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    print(f"{c.model}: {size} parameters, {c.world_size} GPUs of "
          f"{gpu_memory / 2**30:.0f} GiB, seq_len {c.seq_len}, {c.dtype}, {c.optimizer}, {c.method}")
    if not shown:
        print(f"no layout of {len(rows)} runnable ones fits; the smallest needs "
              f"{min(r.memory.total for r in rows) / 2**30:.1f} GiB per GPU (--all lists them)" if rows else
              "no layout cybertron can run for this model on this world size")
        return 0
    print(table(shown, c.top))
    print(f"({len([r for r in rows if r.fits])} of {len(rows)} runnable layouts fit; memory in GiB per GPU, "
          f"transient includes the fixed {overhead / 2**30:.1f} GiB; rel time: per token, 1.00 = fastest)")
    return 0

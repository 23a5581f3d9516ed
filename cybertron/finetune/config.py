"""`cybertron finetune` configuration: the shared train/eval/checkpoint/log/run sections (with defaults
suited to fine-tuning) plus the base model, the chat data and the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cybertron.config import (
    TRAINING_SHORTCUTS,
    CheckpointSection,
    EpochTrainSection,
    EvalSection,
    LogSection,
    ParallelSection,
    RunSection,
    check_dtype,
    opt,
    raise_first_failure,
    validate_shared_sections,
)
from cybertron.data.mixture import parse_mix
from cybertron.data.sft_formats import FORMATS
from cybertron.finetune.lora import DEFAULT_TARGETS, LoRASpec
from cybertron.finetune.quant import SHARD_UNIT

METHODS = ("lora", "dora", "qlora", "full")
CHAT_TEMPLATE_HELP = ("Jinja chat template file that replaces the model's; 'default' = cybertron's built-in format; "
                      "empty = the model's own, or the built-in format when it has none (the run dir keeps the "
                      "template used, as chat_template.jinja)")


@dataclass
class BaseModelSection:
    path: str = opt("", "Hugging Face model directory (config.json, safetensors, tokenizer.json), a PEFT "
                        "adapter directory (merged onto its base) or a cybertron run directory")
    dtype: str = opt("auto", "storage dtype of the frozen base: auto (bf16 when adapters train under bf16 "
                             "autocast, else fp32), fp32 or bf16; full fine-tuning keeps fp32 weights", dtype=True)


@dataclass
class SFTDataSection:
    path: str = opt("", ".jsonl (or .json array, .parquet, .csv, a save_to_disk folder, hf:NAME) of chat "
                        "examples: {'messages': [...]} (OpenAI chat, tool calls too), ShareGPT 'conversations', "
                        "Alpaca 'instruction'/'input'/'output' or {'prompt', 'response'}")
    format: str = opt("auto", "the records' format: auto (by each record's keys), chat, sharegpt, alpaca or "
                              "prompt_response")
    split: str = opt("train", "Hugging Face data sets: the split to read")
    subset: str = opt("", "Hugging Face Hub data sets: the configuration (load_dataset's name)")
    streaming: bool = opt(False, "Hugging Face data sets: read record by record (an IterableDataset)")
    mix: list[dict] = opt([], "a weighted mixture instead of data.path: [[data.mix]] tables with path, weight "
                              "(default 1) and format (default data.format); on the command line "
                              "--data.mix path=FILE,weight=0.7 once per source")
    seq_len: int = opt(0, "tokens per packed training row, longer examples are cut; 0 = the model's maximum, "
                          "at most 1024")
    pack: bool = opt(True, "pack several examples per row (attention never crosses examples)")
    val_fraction: float = opt(0.05, "fraction of examples held out for validation (none if it rounds to 0)")
    chat_template: str = opt("", CHAT_TEMPLATE_HELP)


@dataclass
class MethodSection:
    method: str = opt("lora", "lora, dora, qlora (LoRA over an NF4-quantized base) or full (every weight; "
                              "use a lower --lr such as 2e-5)")
    rank: int = opt(8, "adapter rank r")
    alpha: float = opt(16.0, "adapter scale numerator: the update is (alpha / rank) B A")
    dropout: float = opt(0.0, "dropout on the adapter's input")
    targets: str = opt(",".join(DEFAULT_TARGETS), "comma-separated linear layer names or fnmatch globs "
                                                  "of full names (e.g. layers.*.self_attn.q_proj)")
    nf4_block_size: int = opt(64, "weights per NF4 scale (qlora)")

    def lora_spec(self) -> LoRASpec:
        targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        return LoRASpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=targets,
                        dora=self.method == "dora")


@dataclass
class FinetuneConfig:
    model: BaseModelSection = field(default_factory=BaseModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    finetune: MethodSection = field(default_factory=MethodSection)
    train: EpochTrainSection = field(default_factory=lambda: EpochTrainSection(
        steps=0, global_batch_size=8, lr=2e-4, weight_decay=0.0, min_lr_ratio=0.0))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=50, batches=4, batch_size=8))
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=100, keep=2))
    log: LogSection = field(default_factory=LogSection)
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=lambda: ParallelSection(data_parallel="ddp"))


# The flags of the common case, `cybertron finetune --model DIR --data FILE --method lora`.
SHORTCUTS = {**TRAINING_SHORTCUTS, "--model": "model.path", "--data": "data.path", "--method": "finetune.method",
             "--rank": "finetune.rank", "--seq-len": "data.seq_len", "--lr": "train.lr", "--epochs": "train.epochs"}


def base_model_checks(model: BaseModelSection, weights: str) -> list[tuple[bool, str]]:
    """The base model's checks, shared by finetune and align; `weights` is finetune.method."""
    return [
        check_dtype("model.dtype", model.dtype, ("auto", "fp32", "bf16")),
        (not (weights == "full" and model.dtype == "bf16"), "model.dtype=bf16 needs an adapter method: "
                                                            "full training keeps fp32 master weights"),
    ]


def method_checks(f: MethodSection, flag: str = "") -> list[tuple[bool, str]]:
    """The [finetune] section's checks, shared by finetune and align (`flag` names its shortcut there)."""
    return [
        (f.method in METHODS, f"finetune.method{flag} must be one of {', '.join(METHODS)}, got {f.method!r}"),
        (f.rank >= 1, f"finetune.rank must be >= 1, got {f.rank}"),
        (f.alpha > 0, f"finetune.alpha must be > 0 (the adapter's update is scaled by alpha / rank), got {f.alpha}"),
        (0 <= f.dropout < 1, f"finetune.dropout must be in [0, 1), got {f.dropout}"),
        (f.nf4_block_size >= 2, f"finetune.nf4_block_size must be >= 2, got {f.nf4_block_size}"),
        (bool(f.lora_spec().targets), "finetune.targets names no layer"),
    ]


def validate(cfg: FinetuneConfig, world_size: int = 1) -> None:
    """Reject impossible values before any work (or any process group) starts; each message names the key."""
    d, f = cfg.data, cfg.finetune
    raise_first_failure([
        (bool(cfg.model.path), "model.path (--model) is required: a Hugging Face model directory"),
        (bool(d.path or d.mix), "data.path (--data) is required: a .jsonl (or Hugging Face data set) of chat "
                                "examples, or data.mix"),
        (not (d.path and d.mix), f"give data.path ({d.path}) or data.mix, not both"),
        *method_checks(f),
        *base_model_checks(cfg.model, f.method),
        (d.seq_len == 0 or d.seq_len >= 2, f"data.seq_len must be >= 2 (or 0 = auto), got {d.seq_len}"),
        (0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (d.format in FORMATS, f"data.format must be one of {', '.join(FORMATS)}, got {d.format!r}"),
    ])
    for entry in parse_mix(d.mix, ("format",)):
        fmt = entry.option("format", d.format)
        raise_first_failure([(fmt in FORMATS, f"data.mix {entry.path}: format must be one of {', '.join(FORMATS)}, "
                                              f"got {fmt!r}")])
    validate_shared_sections(cfg)
    validate_layout(cfg, world_size)


def validate_layout(cfg: FinetuneConfig | Any, world_size: int) -> None:
    """The [parallel] section against the world size, the batch and the method (finetune and align share it);
    the model's shape and the resolved seq_len are checked again once the base is open."""
    from cybertron.parallel.runtime import layout_dims  # torch.distributed only when validating
    from cybertron.train.float8 import validate_float8
    from cybertron.train.precision import resolve_device

    dims = layout_dims(cfg, world_size)
    f, t = cfg.finetune, cfg.train
    validate_float8(t.fp8, resolve_device(t.device))
    raise_first_failure([
        (not (f.method == "qlora" and (dims.tp > 1 or dims.pp > 1)),
         f"finetune.method=qlora runs with data parallelism only (ddp or zero3; the NF4 base is not split by "
         f"tensor or pipeline parallelism), got parallel.tp={dims.tp} parallel.pp={dims.pp}"),
        # FSDP2 splits the NF4 base into equal row shards; its scale groups are laid out for SHARD_UNIT shards
        # (finetune/quant.py), so a shard count dividing SHARD_UNIT is the one that can work for every model.
        (not (f.method == "qlora" and dims.dp_shard > 1 and SHARD_UNIT % dims.dp_shard),
         f"finetune.method=qlora with parallel.data_parallel={dims.data_parallel} needs a shard count dividing "
         f"{SHARD_UNIT} (the NF4 base is quantized in groups for {SHARD_UNIT} equal shards), got "
         f"{dims.dp_shard}; use ddp"),
        (not (f.method == "qlora" and dims.data_parallel in ("zero1", "zero2") and dims.dp > 1),
         f"finetune.method=qlora runs with parallel.data_parallel ddp or zero3, got {dims.data_parallel}"),
        (not (t.fp8 != "none" and f.method != "full"),
         f"train.fp8={t.fp8} applies to finetune.method=full: LoRA/DoRA/QLoRA wrap the Linear layers that fp8 "
         "would convert (their frozen base stays in high precision)"),
        (not ((t.fp8 != "none" or t.fused_loss) and dims.pp > 1),
         "train.fp8 and train.fused_loss do not run with pipeline parallelism (parallel.pp > 1) yet"),
    ])

"""Run configuration: typed dataclass sections, a TOML file (`--config FILE`) and `--section.key=value`
overrides. Every key is validated; an unknown key is named with the closest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cybertron.errors import ConfigError


def opt(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - `help` reads best at call sites
    """A config field with its meaning, shown by `--help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


# One dtype vocabulary for every command: the short names are canonical, torch's long names are aliases.
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def canonical_dtype(value: str) -> str:
    """`bfloat16` -> `bf16` (and the other torch names); anything else is returned as given, for the
    validator of the key to accept or name."""
    return DTYPE_ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else value


def check_dtype(key: str, value: str, allowed: tuple[str, ...]) -> tuple[bool, str]:
    """A raise_first_failure check: `value` (already canonical) is one of `allowed`."""
    return value in allowed, (f"{key} must be one of {', '.join(allowed)} (or a torch name such as bfloat16), "
                              f"got {value!r}")


@dataclass
class ModelSection:
    preset: str = opt("nano", "named shape from cybertron/models/presets.py (nano, tiny, debug, llama3-1b, ...)")
    init_from: str = opt("", "Hugging Face model directory to start from instead of random weights")
    vocab_size: int | None = opt(None, "override the preset's vocabulary size (default: the tokenizer's)")
    dim: int | None = opt(None, "override the hidden size")
    n_layers: int | None = opt(None, "override the number of layers")
    n_heads: int | None = opt(None, "override the number of attention heads")
    n_kv_heads: int | None = opt(None, "override the number of key/value heads (GQA)")
    ffn_dim: int | None = opt(None, "override the SwiGLU hidden size")
    max_seq_len: int | None = opt(None, "override the longest sequence the model accepts")
    sliding_window: int | None = opt(None, "sliding-window attention: every layer sees only its last N keys "
                                           "(Mistral style; 0 or unset: full attention)")
    tie_embeddings: bool | None = opt(None, "override whether the output head shares the embedding")
    n_experts: int | None = opt(None, "override the number of routed experts (mixture of experts; 0 = dense)")
    top_k: int | None = opt(None, "override how many experts each token is routed to")
    moe_ffn_dim: int | None = opt(None, "override each expert's SwiGLU hidden size")
    aux_loss_coef: float | None = opt(None, "override the load-balancing loss weight (HF router_aux_loss_coef)")
    bias_update_rate: float | None = opt(None, "auxiliary-loss-free balancing: routing-bias step per optimizer "
                                               "step (DeepSeek-V3; 0 = off)")


@dataclass
class DataSection:
    path: str = opt("", "text file, folder, .jsonl or .parquet; empty = the Python stdlib's own source")
    text_field: str = opt("text", "field holding the text in .jsonl/.parquet records")
    tokenizer: str = opt("", "tokenizer.json (or a folder with one); empty = train a BPE tokenizer on the data")
    vocab_size: int = opt(4096, "vocabulary size when training a tokenizer")
    tokenizer_train_chars: int = opt(8_000_000, "characters of data the tokenizer is trained on")
    seq_len: int = opt(128, "tokens per training sequence")
    val_fraction: float = opt(0.05, "fraction of documents held out for validation")
    cache_dir: str = opt("", "where tokenized shards are cached; empty = ~/.cache/cybertron")
    split: str = opt("train", "Hugging Face data sets (data.path hf:NAME, hf:FILES or a save_to_disk folder): "
                              "the split to read")
    subset: str = opt("", "Hugging Face Hub data sets: the configuration (load_dataset's name)")
    streaming: bool = opt(False, "Hugging Face data sets: read record by record (an IterableDataset)")
    mix: list[dict] = opt([], "a weighted mixture instead of data.path: [[data.mix]] tables with path, weight "
                              "(default 1) and text_field (default data.text_field); on the command line "
                              "--data.mix path=FILE,weight=0.7 once per source")
    verify: bool = opt(False, "fingerprint the data by hashing its content instead of file size/mtime/inode "
                              "(slower start; catches a file rewritten with its old size and mtime)")


@dataclass
class TrainSection:
    steps: int = opt(400, "optimizer steps")
    global_batch_size: int = opt(32, "sequences per optimizer step, over all data-parallel ranks")
    micro_batch_size: int = opt(0, "sequences per forward/backward on one rank; 0 = no accumulation")
    lr: float = opt(3e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms, biases, embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = off")
    seed: int = opt(0, "seed for weights and data order")
    dtype: str = opt("auto", "compute dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 (autocast) or fp16 "
                             "(autocast with dynamic loss scaling, for GPUs without bf16)",
                     dtype=True)
    device: str = opt("auto", "auto, cpu or cuda")
    compile: bool = opt(False, "torch.compile: forward + loss on one process, each block under parallel layouts")
    fused_loss: bool = opt(False, "output head + cross-entropy chunk by chunk: the full logits never exist "
                                  "(one process; saves ~3x tokens x vocab x 2 bytes of activation memory)")
    fp8: str = opt("none", "FP8 matmuls in the Linear layers (torchao float8; CUDA compute capability >= 8.9): "
                           "none, tensorwise or rowwise scaling")
    max_skipped_steps: int = opt(5, "steps in a row whose loss or gradient norm is not finite that are skipped "
                                    "(no update); the next one stops the run as diverged; 0 = stop at the first")
    spike_zscore: float = opt(0.0, "roll back to the newest checkpoint when a step's loss is this many standard "
                                   "deviations above the mean of the last train.spike_window steps, and go on "
                                   "with the batches after it; 0 = off")
    spike_window: int = opt(50, "accepted steps the loss-spike detector compares a step's loss with")


@dataclass
class EpochTrainSection(TrainSection):
    """Fine-tuning and alignment: the amount of work is given in optimizer steps or in passes over the data,
    and the warmup follows the run's length (a few epochs of small data are only a few steps)."""

    steps: int = opt(0, "optimizer steps; 0 = from train.epochs")
    warmup_steps: int = opt(-1, "linear warmup steps; -1 = a tenth of the run's steps, at most 10")
    epochs: float = opt(0.0, "passes over the training rows (packed SFT rows, preference pairs, GRPO prompts), "
                             "used when train.steps is 0: steps = ceil(epochs x rows / global batch); "
                             "0 with train.steps 0 = 3 epochs; give train.steps or train.epochs, not both")


@dataclass
class EvalSection:
    every: int = opt(100, "evaluate every N steps (and at the end); 0 = only at the end")
    batches: int = opt(8, "validation batches per evaluation")
    batch_size: int = opt(32, "sequences per validation batch")


@dataclass
class CheckpointSection:
    every: int = opt(100, "save every N steps (and at the end); 0 = only at the end")
    keep: int = opt(2, "complete checkpoints kept; older ones are deleted")
    async_save: bool = opt(True, "write checkpoints in a background thread while training continues "
                                 "(costs host memory for one copy of the saved state until written)")


# Where metrics can go: backend -> (the module it imports, the optional extra that installs it). metrics.jsonl
# is always written (the run directory's contract), so "jsonl" needs nothing.
LOG_BACKENDS: dict[str, tuple[str, str] | None] = {
    "jsonl": None, "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass
class LogSection:
    every: int = opt(10, "log metrics every N steps")
    backends: list[str] = opt(["jsonl"], "where metrics go besides metrics.jsonl (always written): tensorboard, "
                                         "wandb, mlflow; several at once: --log.backends=jsonl,wandb,mlflow")
    tensorboard: bool = opt(True, "also write TensorBoard events whenever tensorboard is installed "
                                  "(log.backends=tensorboard requires it)")
    progress: str = opt("auto", "auto (bar on a terminal), bar, or lines")
    run_name: str = opt("", "the run's name in wandb and MLflow; empty = the run directory's name")
    wandb_project: str = opt("cybertron", "Weights & Biases project")
    wandb_entity: str = opt("", "Weights & Biases team or user; empty = your default entity")
    wandb_mode: str = opt("", "online, offline (written under RUN/wandb; `wandb sync` uploads it later) or "
                              "disabled; empty = wandb's own setting (WANDB_MODE, else online)")
    mlflow_tracking_uri: str = opt("", "MLflow tracking URI (http://host:5000, databricks, file:/path, ...); "
                                       "empty = a file store in RUN/mlruns")
    mlflow_experiment: str = opt("cybertron", "MLflow experiment the run is filed under")


@dataclass
class RunSection:
    out: str = opt("", "run directory; empty = runs/<timestamp>")
    resume: bool = opt(False, "continue from the newest complete checkpoint in the run directory")


@dataclass
class ParallelSection:
    data_parallel: str = opt("zero3", "how data-parallel ranks share state: ddp, zero1 (optimizer sharded), "
                                      "zero2 (+ gradients), zero3 (+ parameters; FSDP2)")
    dp_replicate: int = opt(1, "replicas (HSDP: replicate x dp_shard); ddp/zero1 replicate over all dp ranks")
    dp_shard: int = opt(-1, "ranks one FSDP group shards over; -1 = the rest of the world")
    tp: int = opt(1, "tensor-parallel degree (splits heads and the FFN; must divide them)")
    sequence_parallel: bool = opt(True, "with tp > 1, shard norms and the residual stream over the sequence")
    loss_parallel: bool = opt(True, "with tp > 1, compute the cross-entropy on vocabulary-sharded logits")
    pp: int = opt(1, "pipeline-parallel degree (ranks the layers are split over)")
    cp: int = opt(1, "context-parallel degree: ranks that each hold 1/cp of every sequence (long contexts); "
                     "data.seq_len must be a multiple of 2 x cp")
    ep: int = opt(1, "expert-parallel degree (mixture-of-experts models): ranks the experts are split over, "
                     "borrowed from dp_shard (world = pp x dp_replicate x dp_shard x tp, ep must divide dp_shard "
                     "and model.n_experts; each expert is FSDP-sharded over the other dp_shard / ep ranks)")
    pp_schedule: str = opt("1f1b", "gpipe, 1f1b, interleaved_1f1b, looped_bfs, interleaved_zb, zbv, dualpipev")
    pp_microbatches: int = opt(0, "micro-batches per pipeline step; 0 = the number of stages")
    pp_virtual_stages: int = opt(1, "stages per pipeline rank (2+ for interleaved schedules, 2 for zbv)")
    activation_checkpoint: str = opt("none", "recompute activations in backward: none, full or selective")
    cpu_offload: bool = opt(False, "keep FSDP parameters, gradients and optimizer state in CPU memory")
    timeout_s: int = opt(600, "seconds a collective may wait before the run fails (not hangs)")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)


def raise_first_failure(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def validate_shared_sections(cfg: Any) -> None:
    """Checks of the sections every training command shares (train, eval, checkpoint, log); each names the key."""
    t = cfg.train
    epochs = isinstance(t, EpochTrainSection)
    raise_first_failure([
        (t.steps >= 1 or (epochs and t.steps == 0),
         f"train.steps must be >= 1{' (or 0 = from train.epochs)' if epochs else ''}, got {t.steps}"),
        (not epochs or t.epochs >= 0, f"train.epochs must be >= 0, got {getattr(t, 'epochs', 0)}"),
        (not epochs or not (t.steps and t.epochs), f"give train.steps ({t.steps}) or train.epochs "
                                                   f"({getattr(t, 'epochs', 0)}), not both: steps = 0 derives "
                                                   "them from epochs"),
        (t.lr >= 0, f"train.lr must be >= 0, got {t.lr} (a negative learning rate ascends the loss)"),
        (t.global_batch_size >= 1, f"train.global_batch_size must be >= 1, got {t.global_batch_size}"),
        (t.micro_batch_size >= 0, f"train.micro_batch_size must be >= 0, got {t.micro_batch_size}"),
        (t.warmup_steps >= 0 or (epochs and t.warmup_steps == -1),
         f"train.warmup_steps must be >= 0{' (or -1 = auto)' if epochs else ''}, got {t.warmup_steps}"),
        (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1/beta2 must be in [0, 1), got {t.beta1}, {t.beta2}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}"),
        (t.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0, got {t.max_skipped_steps}"),
        (t.spike_zscore >= 0, f"train.spike_zscore must be >= 0 (0 = off), got {t.spike_zscore}"),
        (t.spike_window >= 2, f"train.spike_window must be >= 2 (a standard deviation needs two losses), "
                              f"got {t.spike_window}"),
        (cfg.eval.every >= 0 and cfg.checkpoint.every >= 0, "eval.every and checkpoint.every must be >= 0"),
        (cfg.eval.batches >= 1 and cfg.eval.batch_size >= 1, "eval.batches and eval.batch_size must be >= 1"),
        (cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}"),
        (cfg.log.every >= 1, f"log.every must be >= 1, got {cfg.log.every}"),
        (cfg.log.progress in ("auto", "bar", "lines"), f"log.progress must be auto, bar or lines, "
                                                         f"got {cfg.log.progress!r}"),
    ])
    check_log_section(cfg.log)
    cfg.log.backends = log_backends(cfg.log)  # config.toml records the resolved list
    if t.micro_batch_size and t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")


def log_backends(log: LogSection) -> list[str]:
    """log.backends as a clean list: commas split (`--log.backends=jsonl,wandb`), case folded, repeats
    dropped, and jsonl always first."""
    names = [n.strip().lower() for item in log.backends for n in item.split(",") if n.strip()]
    return list(dict.fromkeys(["jsonl", *names]))


def check_log_section(log: LogSection) -> None:
    """Each backend is known and installed (one line naming the extra to install otherwise), before anything
    is built: a run must not train for an hour and then find it cannot log."""
    for name in log_backends(log):
        if name not in LOG_BACKENDS:
            close = difflib.get_close_matches(name, list(LOG_BACKENDS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"log.backends: unknown backend {name!r}; {hint}choose from {', '.join(LOG_BACKENDS)}")
        needs = LOG_BACKENDS[name]
        if needs is not None and importlib.util.find_spec(needs[0]) is None:
            raise ConfigError(f"log.backends includes {name}, but the {needs[0]} package is not installed: "
                              f"pip install 'cybertron[{needs[1]}]'")
    raise_first_failure([
        (log.wandb_mode in WANDB_MODES, f"log.wandb_mode must be online, offline, disabled or empty, "
                                        f"got {log.wandb_mode!r}"),
        (log.tensorboard or "tensorboard" not in log_backends(log),
         "log.backends includes tensorboard but log.tensorboard is false; drop one of them"),
    ])


# Shortcut flags -> full keys that every training command (train, finetune, align) has. Each command declares
# its whole {flag: key} table and hands it to parse_args and help_text; a shortcut of a bool key takes no value.
TRAINING_SHORTCUTS = {"--steps": "train.steps", "--out": "run.out", "--resume": "run.resume",
                      "--device": "train.device"}


def sections(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def all_keys(cfg: Any) -> list[str]:
    return [f"{name}.{f.name}" for name, sec in sections(cfg).items() for f in dataclasses.fields(sec)]


def _field_type(section: Any, key: str) -> Any:
    hints = typing.get_type_hints(type(section))
    return hints[key]


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a TOML or command-line value to the field's type; ConfigError naming the key if it can't."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        # "none" is a value of a text key (a prompt may say none), a null elsewhere.
        if value is None or (args[0] is not str and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], key)
    if origin is list:
        (item,) = typing.get_args(typ)
        return [coerce(v, item, key) for v in (value if isinstance(value, list) else [value])]
    if typ is dict or origin is dict:
        return _coerce_table(value, key)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{key} expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _coerce_table(value: Any, key: str) -> dict:
    """A TOML table, or on the command line `k=v,k=v` (or a JSON object) with string values."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        elif text and all("=" in item for item in text.split(",")):
            return {k.strip(): v.strip() for k, _, v in (item.partition("=") for item in text.split(","))}
    raise ConfigError(f"{key} expects a table such as path=FILE,weight=0.5 (or [[{key}]] in TOML), got {value!r}")


# Names users bring from other trainers (transformers, torchtitan, DeepSpeed) -> ours, for suggestions.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps", "training_steps": "steps",
           "batch_size": "global_batch_size", "per_device_train_batch_size": "micro_batch_size",
           "max_grad_norm": "grad_clip", "warmup": "warmup_steps", "output_dir": "out",
           "seq_length": "seq_len", "max_seq_length": "seq_len", "sequence_length": "seq_len"}


def _unknown_key(key: str, cfg: Any) -> ConfigError:
    section, _, name = key.partition(".")
    keys = all_keys(cfg)
    alias = f"{section}.{ALIASES[name]}" if name in ALIASES else None
    same_section = [k for k in keys if k.startswith(section + ".")]
    close = ([alias] if alias in keys else []) or [
        f"{section}.{m}" for m in difflib.get_close_matches(name, [k.split(".", 1)[1] for k in same_section],
                                                            n=1, cutoff=0.5)
    ] or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; `--help` lists every key"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _unknown_flag(flag: str, cfg: Any, shortcuts: dict[str, str]) -> ConfigError:
    """A `--name` without a section is a mistyped shortcut or key: compare it with every shortcut and with
    every key's field name (shortcuts win ties), so `--methd` suggests `--method`, not `model.path`."""
    name = flag[2:].replace("-", "_")
    name = ALIASES.get(name, name)
    options = [(s, s[2:].replace("-", "_")) for s in shortcuts]
    options += [(f"--{key}", key.split(".", 1)[1]) for key in all_keys(cfg)]
    ratio, _, best = max((difflib.SequenceMatcher(None, name, field_name).ratio(), -i, label)
                         for i, (label, field_name) in enumerate(options))
    hint = f"; did you mean {best}?" if ratio >= 0.6 else "; options look like --section.key=value (`--help`)"
    return ConfigError(f"unknown option {flag!r}{hint}")


def _field(cfg: Any, key: str) -> dataclasses.Field:
    section_name, _, name = key.partition(".")
    secs = sections(cfg)
    fields = {f.name: f for f in dataclasses.fields(secs[section_name])} if section_name in secs else {}
    if name not in fields:
        raise _unknown_key(key, cfg)
    return fields[name]


def _key_type(cfg: Any, key: str) -> Any:
    """The declared type of `section.name`; ConfigError with a suggestion for an unknown key."""
    return _field_type(sections(cfg)[key.partition(".")[0]], _field(cfg, key).name)


def set_key(cfg: Any, key: str, value: Any, append: bool = False) -> None:
    """Set one key from TOML or the command line; `append` adds to a list-valued key (a repeated flag)."""
    f = _field(cfg, key)
    section = sections(cfg)[key.partition(".")[0]]
    value = coerce(value, _field_type(section, f.name), key)
    if f.metadata.get("dtype"):
        value = canonical_dtype(value)
    setattr(section, f.name, getattr(section, f.name) + value if append else value)


def apply_toml(cfg: Any, path: str | Path) -> None:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    for section_name, values in data.items():
        if not isinstance(values, dict):
            raise _unknown_key(section_name, cfg)
        for name, value in values.items():
            set_key(cfg, f"{section_name}.{name}", value)


def parse_args(argv: list[str], cfg: Any, shortcuts: dict[str, str] | None = None,
               renamed: dict[str, str] | None = None) -> Any:
    """Apply `--config FILE` first, then `--section.key=value` / `--section.key value` overrides in order.

    `shortcuts` is the command's whole {flag: key} table (`--prompt` -> `generate.prompt`): a shortcut of a bool
    key takes no value (`--greedy`; `--greedy=false` still works). A list-valued key repeats: its first flag
    replaces the file's value, later ones append. `renamed` maps an old spelling that now means something else
    to the one-line error naming the new one."""
    shortcuts = shortcuts or {}
    pairs: list[tuple[str, Any]] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        flag = "--" + name
        if renamed and flag in renamed:
            raise ConfigError(renamed[flag])
        if "." not in name and flag != "--config" and flag not in shortcuts:
            raise _unknown_flag(flag, cfg, shortcuts)
        key = shortcuts.get(flag, name)
        is_bool_flag = flag in shortcuts and _key_type(cfg, key) is bool
        if not eq and not is_bool_flag:
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 1
        elif not eq:
            value = "true"
        i += 1
        if flag == "--config":
            config_file = value
        else:
            pairs.append((key, value))
    if config_file:
        apply_toml(cfg, config_file)
    seen: set[str] = set()
    for key, value in pairs:
        is_list = typing.get_origin(_key_type(cfg, key)) is list
        set_key(cfg, key, value, append=is_list and key in seen)
        seen.add(key)
    return cfg


def help_text(cfg: Any, command: str, shortcuts: dict[str, str] | None = None) -> str:
    lines = [f"usage: cybertron {command} [--config FILE] [--section.key=value ...]", ""]
    if shortcuts:
        lines += ["shortcuts: " + ", ".join(f"{k} = --{v}" for k, v in shortcuts.items()), ""]
    for section_name, section in sections(cfg).items():
        lines.append(f"[{section_name}]")
        for f in dataclasses.fields(section):
            default = getattr(section, f.name)
            flag = f"--{section_name}.{f.name}"
            lines.append(f"  {flag:<34} {default!r:<12} {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def to_toml(cfg: Any) -> str:
    """The resolved config as TOML (None values are omitted: TOML has no null)."""
    out = []
    for section_name, section in sections(cfg).items():
        out.append(f"[{section_name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if value is not None:
                out.append(f"{f.name} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes (\n, \", \\, \uXXXX) are all valid in a TOML basic string; a raw newline is not.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")

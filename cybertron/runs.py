"""The run directory: its metadata file (run.json) and loading a run back as a model.

A run directory holds config.toml, the tokenizer files, metrics.jsonl, checkpoints/step-N/ (DCP) and
run.json, which says what the checkpoints are: the run's kind (pretrain, finetune or reward), the base it
started from, its adapters (method, LoRA spec, NF4 block size; none when the checkpoints hold every weight),
its head and, for `cybertron align` runs, the alignment method. A LoRA/DoRA/QLoRA checkpoint holds adapters
only (small): the base is re-read from the directory run.json records.

Runs written before run.json existed are still read: a fine-tuning or alignment run's finetune.json, and
no metadata at all for a pretraining run.

This module sits above finetune/ and align/ (it builds adapter and reward models) and below the commands:
generate, serve, export and the finetune/align commands (for a run directory given as --model) load through
`load_run`; the finetune/align libraries receive an opened base (`open_base`) and never read a run themselves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cybertron.align.config import AlignConfig
from cybertron.align.reward import HEAD as REWARD_HEAD
from cybertron.align.reward import RewardModel
from cybertron.config import TrainConfig
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import CheckpointError, UserError
from cybertron.files import write_text_atomic
from cybertron.finetune.config import FinetuneConfig, MethodSection
from cybertron.finetune.lora import LoRASpec, lora_modules, merge_lora_, trainable_view
from cybertron.finetune.model import BaseModel, build_finetune_model
from cybertron.finetune.peft_format import apply_peft_adapter, is_peft_dir, read_peft_adapter
from cybertron.models.config import ModelConfig
from cybertron.models.hf import load_hf_model, read_hf_config
from cybertron.models.llama import Transformer
from cybertron.serve.multi_lora import LoraAdapter, LoraLayer
from cybertron.train.checkpoint import load_checkpoint, read_model_config, resolve_checkpoint
from cybertron.train.precision import DTYPES

RUN_FILE = "run.json"
LEGACY_FILE = "finetune.json"  # what fine-tuning and alignment runs recorded before run.json
FORMAT = 1
KINDS = ("pretrain", "finetune", "reward")
LM_HEAD = "lm"


@dataclass(frozen=True)
class Adapters:
    """Trained adapters over a frozen base: what the checkpoints of a lora/dora/qlora run hold."""

    method: str  # lora, dora or qlora
    lora: LoRASpec
    nf4_block_size: int = 64

    def method_section(self) -> MethodSection:
        """The [finetune] section that rebuilds this model shape (finetune.model.build_finetune_model)."""
        return MethodSection(method=self.method, rank=self.lora.rank, alpha=self.lora.alpha,
                             dropout=self.lora.dropout, targets=",".join(self.lora.targets),
                             nf4_block_size=self.nf4_block_size)


@dataclass(frozen=True)
class RunMeta:
    """What a run directory's checkpoints are (run.json)."""

    kind: str  # pretrain (a whole model), finetune (SFT or an aligned policy) or reward (a reward model)
    base_model: str | None = None  # the directory the weights started from; None when trained from scratch
    adapters: Adapters | None = None  # None: every weight is in the checkpoints
    head: str = LM_HEAD  # lm (next-token logits) or reward (one score per sequence)
    align_method: str | None = None  # dpo, ipo, simpo, orpo, reward or grpo for a `cybertron align` run

    @property
    def method(self) -> str:
        """The weights that trained: full, or the adapter method."""
        return self.adapters.method if self.adapters is not None else "full"

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunMeta:
        if data["kind"] not in KINDS:
            raise ValueError(f"kind {data['kind']!r} is not one of {', '.join(KINDS)}")
        adapters = data.get("adapters")
        if adapters is not None:
            adapters = Adapters(adapters["method"], LoRASpec(**adapters["lora"]), adapters["nf4_block_size"])
        return cls(data["kind"], data.get("base_model"), adapters, data.get("head", LM_HEAD),
                   data.get("align_method"))

    @classmethod
    def from_legacy(cls, data: dict[str, Any]) -> RunMeta:
        """A finetune.json: {method, base_model, lora, nf4_block_size, [align_method], [head]}."""
        head = data.get("head", LM_HEAD)
        adapters = None
        if data["method"] != "full":
            adapters = Adapters(data["method"], LoRASpec(**data["lora"]), data.get("nf4_block_size", 64))
        return cls("reward" if head == REWARD_HEAD else "finetune", data["base_model"], adapters, head,
                   data.get("align_method"))

    def write(self, run_dir: Path) -> None:
        """run.json in `run_dir` (a method calls this on its main rank when the run starts)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / RUN_FILE, json.dumps(self.to_dict(), indent=2) + "\n")


def pretrain_meta(cfg: TrainConfig) -> RunMeta:
    return RunMeta("pretrain", base_model=_resolved(cfg.model.init_from))


def finetune_meta(cfg: FinetuneConfig | AlignConfig) -> RunMeta:
    """SFT, or an aligned policy / reward model when `cfg` is an AlignConfig."""
    f = cfg.finetune
    adapters = None if f.method == "full" else Adapters(f.method, f.lora_spec(), f.nf4_block_size)
    align_method = cfg.align.method if isinstance(cfg, AlignConfig) else None
    reward = align_method == "reward"
    return RunMeta("reward" if reward else "finetune", _resolved(cfg.model.path), adapters,
                   REWARD_HEAD if reward else LM_HEAD, align_method)


def converted_meta(hf_dir: Path) -> RunMeta:
    """`cybertron convert --from-hf`: a whole model whose weights came from an HF directory."""
    return RunMeta("pretrain", base_model=_resolved(hf_dir))


def _resolved(path: str | Path | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _meta_file(run_dir: Path) -> Path:
    return run_dir / (RUN_FILE if (run_dir / RUN_FILE).is_file() or not (run_dir / LEGACY_FILE).is_file()
                      else LEGACY_FILE)


def read_meta(run_dir: Path) -> RunMeta:
    """The run's metadata: run.json, else a legacy finetune.json, else a pretraining run."""
    run_dir = Path(run_dir)
    for name, parse in ((RUN_FILE, RunMeta.from_dict), (LEGACY_FILE, RunMeta.from_legacy)):
        path = run_dir / name
        if path.is_file():
            try:
                return parse(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
                raise CheckpointError(f"{path} is not valid run metadata ({type(err).__name__}: {err}); it "
                                      "records the base model and adapters of the run") from err
    return RunMeta("pretrain")


# ---- loading a run ------------------------------------------------------------------------------------------

@dataclass
class LoadedRun:
    """A run loaded for use: the model in eval mode (a RewardModel for a reward run), its tokenizer, the run's
    metadata and the checkpoint the weights came from."""

    model: nn.Module
    tokenizer: TextTokenizer
    meta: RunMeta
    checkpoint: Path
    run_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = self.checkpoint.parent.parent


def load_run(path: Path, device: torch.device | str = "cpu", merge: bool = True,
             head: str | None = None) -> LoadedRun:
    """A run directory (newest checkpoint) or one of its checkpoints, loaded.

    merge=True folds adapters into plain nn.Linear weights (a QLoRA base is dequantized): the result is an
    ordinary Transformer (or RewardModel) that serving and export handle like any other; merge=False keeps
    the adapters. `head` ("lm" to generate) refuses a run with another head before any weight is read."""
    ckpt = resolve_checkpoint(Path(path))
    run_dir = ckpt.parent.parent
    meta = read_meta(run_dir)
    if head == LM_HEAD and meta.head == REWARD_HEAD:
        raise CheckpointError(f"{run_dir} is a reward model (`cybertron align --method reward`): it scores text "
                              "and does not generate; use it as `cybertron align --method grpo --reward RUN_DIR`")
    device = torch.device(device)
    wrap = RewardModel if meta.head == REWARD_HEAD else None
    if meta.adapters is None:  # the checkpoint holds every weight: build empty, then load
        with torch.device("meta"):
            model = Transformer(read_model_config(ckpt))
            if wrap is not None:
                model = wrap(model)
        model.to_empty(device=device)
        (model.model if wrap is not None else model).tie_weights()
        load_checkpoint(ckpt, model, None, verified=True)
    else:
        base = Path(meta.base_model or "")
        if not meta.base_model or not base.is_dir():
            what, held = ("reward run", "adapters and the score head") if wrap is not None else \
                ("fine-tuning run", "adapters")
            raise CheckpointError(f"the base model {base} of {what} {run_dir} is gone; its checkpoints hold {held} "
                                  f"only (restore the directory or edit {_meta_file(run_dir).name})")
        weights = load_base_weights(base, device, torch.float32)
        model = build_finetune_model(weights, meta.adapters.method_section(), seed=0, wrap=wrap)
        load_checkpoint(ckpt, trainable_view(model), None, verified=True)
        if merge:
            merge_lora_(model)
    tok_path = next((p for p in (run_dir, ckpt) if (p / "tokenizer.json").is_file()), None)
    if tok_path is None:
        raise CheckpointError(f"no tokenizer.json in run directory {run_dir}")
    return LoadedRun(model.eval(), TextTokenizer.load(tok_path), meta, ckpt)


def load_reward_model(path: Path, device: torch.device | str = "cpu") -> RewardModel:
    """The reward model of a `cybertron align --method reward` run (GRPO's align.reward=RUN_DIR), adapters
    kept apart as trained, in eval mode."""
    if read_meta(path).head != REWARD_HEAD:
        raise UserError(f"align.reward: {path} is a directory but not a reward-model run "
                        "(`cybertron align --method reward`)")
    return load_run(path, device, merge=False).model


# ---- a base to fine-tune or align ---------------------------------------------------------------------------

def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_base(path: Path) -> tuple[ModelConfig, TextTokenizer]:
    """(model config, tokenizer) of a base (a Hugging Face, PEFT adapter or run directory), checked without
    loading any weight."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model.path {path} is not a directory; give a Hugging Face model directory, a PEFT "
                        "adapter directory or a cybertron run directory")
    if is_peft_dir(path):  # the base's config; the adapter's own tokenizer files when it carries them
        cfg, tokenizer = read_base(read_peft_adapter(path).base)  # every check now, before any slow work
        return cfg, (TextTokenizer.load(path) if (path / "tokenizer.json").is_file() else tokenizer)
    if is_hf_dir(path):
        cfg = read_hf_config(path)
        if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")) \
                and not any(path.glob("*.safetensors")):
            raise UserError(f"{path} has no weights: expected model.safetensors or model.safetensors.index.json")
        tokenizer_dir = path
    else:
        try:
            ckpt = resolve_checkpoint(path, report=None)  # load_run reports a fallback, once
        except UserError as err:
            raise UserError(f"{path} is not a Hugging Face model directory (config.json is missing), a PEFT "
                            "adapter directory (adapter_config.json) nor a cybertron run directory (no complete "
                            "checkpoint)") from err
        cfg = read_model_config(ckpt)
        tokenizer_dir = ckpt.parent.parent
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"{tokenizer_dir} has no tokenizer.json")
    tokenizer = TextTokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, more than the "
                        f"model's vocab_size {cfg.vocab_size}")
    return cfg, tokenizer


def open_base(path: Path) -> BaseModel:
    """A base for `cybertron finetune` / `cybertron align`: checked now, its weights read by `load(device, dtype)`
    as a plain Transformer in train mode (a run's adapters merged in)."""
    path = Path(path)
    cfg, tokenizer = read_base(path)
    return BaseModel(path, cfg, tokenizer, lambda device, dtype: load_base_weights(path, device, dtype))


def load_base_weights(path: Path, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """A base's weights as a plain Transformer in train mode (a fine-tuned run's or a PEFT adapter's adapters
    merged in)."""
    if is_peft_dir(path):
        return load_peft_model(path, device).to(dtype).train()
    if is_hf_dir(path):
        return load_hf_model(path, device=device, dtype=dtype)
    return load_run(path, device, head=LM_HEAD).model.to(dtype).train()


def load_peft_model(path: Path, device: torch.device | str = "cpu", merge: bool = True) -> Transformer:
    """A PEFT LoRA/DoRA adapter directory on its base (base_model_name_or_path: a Hugging Face or run
    directory), in eval mode: merged into plain weights, or kept as LoRALinear layers (merge=False)."""
    adapter = read_peft_adapter(Path(path))
    model = apply_peft_adapter(load_base_weights(adapter.base, device, torch.float32), adapter)
    return (merge_lora_(model) if merge else model).eval()


# ---- generate and serve -------------------------------------------------------------------------------------

def load_for_inference(path: Path, as_run: bool, device: torch.device,
                       dtype: str = "auto") -> tuple[Transformer, TextTokenizer, str]:
    """(model in eval mode, tokenizer, a display name) from a model source, as `cybertron generate` and
    `cybertron serve` take it: a Hugging Face directory, a PEFT adapter directory (merged onto its base) or a run
    directory (`as_run`: given with --run, so an HF directory there is a mistake). `dtype` (canonical: auto, fp32,
    bf16, fp16) applies to an HF model and a PEFT adapter's merged model."""
    flag = "--run" if as_run else "--model"
    if not path.is_dir():
        raise UserError(f"{flag} {path} is not a directory; give a Hugging Face model directory or a cybertron "
                        "run directory")
    if as_run or not (is_hf_dir(path) or is_peft_dir(path)):  # load_run names what a run directory lacks
        run = load_run(path, device, head=LM_HEAD)
        return run.model, run.tokenizer, path.resolve().name
    torch_dtype = DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if is_peft_dir(path):
        _, tokenizer = read_base(path)
        return load_peft_model(path, device).to(torch_dtype), tokenizer, path.resolve().name
    model = load_hf_model(path, device=device, dtype=torch_dtype)
    return model.eval(), TextTokenizer.load(path), path.resolve().name


# ---- adapters served side by side (`cybertron serve --lora NAME=PATH`) ---------------------------------------

def read_served_adapter(name: str, path: Path) -> LoraAdapter:
    """A LoRA/DoRA adapter to serve over the served base, as plain tensors: a PEFT adapter directory, or a
    cybertron lora/dora/qlora fine-tuning run (its newest checkpoint). Its shapes are checked against the base
    when the engine attaches it (serve/multi_lora.py); UserError (one line) for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--lora {name}={path}: not a directory; give a PEFT adapter directory or a cybertron "
                        "LoRA fine-tuning run")
    if is_peft_dir(path):
        adapter = read_peft_adapter(path, resolve_base=False)  # the base is the served model, not its record
        scale = adapter.spec.alpha / adapter.spec.rank
        t = adapter.tensors
        return LoraAdapter(name, {m: LoraLayer(t[f"{m}.lora_A"].float(), t[f"{m}.lora_B"].float() * scale,
                                               _float_or_none(t.get(f"{m}.magnitude")))
                                  for m in adapter.spec.targets}, str(adapter.base) or None)
    try:
        ckpt = resolve_checkpoint(path, report=None)
    except UserError as err:
        raise UserError(f"--lora {name}={path} is neither a PEFT adapter directory (adapter_config.json) nor a "
                        "cybertron run directory") from err
    meta = read_meta(ckpt.parent.parent)
    if meta.adapters is None:
        raise UserError(f"--lora {name}={path} is a {meta.kind} run whose checkpoints hold every weight, not "
                        "adapters; serve it on its own with --model")
    adapter = adapter_from_model(name, load_run(path, merge=False, head=LM_HEAD).model)
    return LoraAdapter(name, adapter.layers, meta.base_model)


def adapter_from_model(name: str, model: nn.Module) -> LoraAdapter:
    """The LoRALinear layers of `model` (finetune/lora.py) as an adapter to serve, scale folded into B."""
    layers = {module: LoraLayer(m.lora_A.detach().float().cpu(), (m.lora_B.detach().float() * m.scale).cpu(),
                                _float_or_none(m.magnitude))
              for module, m in lora_modules(model)}
    if not layers:
        raise UserError(f"adapter {name!r}: the model holds no LoRA layers")
    return LoraAdapter(name, layers)


def _float_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().cpu()

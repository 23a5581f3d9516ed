"""Supervised fine-tuning (`cybertron finetune`): a base model + chat .jsonl -> a run directory of checkpoints.

Methods: full (every weight trains), lora / dora (adapters only; checkpoints hold adapters alone) and qlora
(LoRA over a base stored in NF4). The loop is the one Trainer with the language-model step: SFT differs
from pretraining only by its data (packed chat examples whose prompt tokens carry no loss). A model without a
chat template (one pretrained by `cybertron train`) is tuned in the default chat format that serve uses too,
and every run dir keeps the template it trained with (chat_template.jinja), which export carries along. The
command (cybertron/commands/finetune.py) opens the base through runs.py and hands it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cybertron.config import ParallelSection
from cybertron.data.chat_template import ChatFormat, remedy_on_failure, resolve_chat_format
from cybertron.data.hf import HFOptions
from cybertron.data.mixture import parse_mix
from cybertron.data.sft import (
    RowLoader,
    RowMixtureLoader,
    SFTData,
    build_sft_data,
    build_sft_mixture,
    eval_batches,
    row_loader,
)
from cybertron.data.tokenizer import CHAT_TEMPLATE_FILE, TextTokenizer, copy_tokenizer_files
from cybertron.errors import ConfigError
from cybertron.files import write_text_atomic
from cybertron.finetune.config import FinetuneConfig
from cybertron.finetune.lora import count_params
from cybertron.finetune.model import BaseModel, OpenBase, base_dtype, build_finetune_model, saved_module
from cybertron.finetune.peft_format import tokenizer_dir
from cybertron.finetune.quant import check_shardable, quantized_bits_per_param
from cybertron.models.config import ModelConfig
from cybertron.parallel.build_trainer import build_trainer
from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.runtime import DistEnv, layout_dims
from cybertron.parallel.world import World, run_on_world
from cybertron.train import session
from cybertron.train.epochs import WorkPlan, plan_work
from cybertron.train.guard import GuardSettings
from cybertron.train.metrics import memory_gib
from cybertron.train.precision import resolve_dtype
from cybertron.train.schedule import lr_at
from cybertron.train.session import Driver, Finished, RecordRun, find_resume_checkpoint, resolve_run_dir, write_config
from cybertron.train.trainer import Batch, StepResult, Trainer, to_device

AUTO_MAX_SEQ_LEN = 1024  # data.seq_len=0: the model's context, capped (SFT examples are rarely longer)


def check_chat_format(base: BaseModel, chat_template: str = "") -> tuple[ModelConfig, TextTokenizer, ChatFormat]:
    """The base's config and tokenizer (runs.open_base checked them) and the chat format (data.chat_template,
    the model's own, or the default), which the returned tokenizer carries; checked before any slow work."""
    chat = resolve_chat_format(base.tokenizer.chat_template, chat_template)
    base.tokenizer.chat_template = chat.template
    return base.config, base.tokenizer, chat


def resolve_seq_len(requested: int, model_cfg: ModelConfig) -> int:
    """data.seq_len, where 0 means the model's context capped at AUTO_MAX_SEQ_LEN; never above the context."""
    seq_len = requested or min(model_cfg.max_seq_len, AUTO_MAX_SEQ_LEN)
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} is above the model's maximum sequence length "
                          f"{model_cfg.max_seq_len}")
    return seq_len


def run_finetune(cfg: FinetuneConfig, open_base: OpenBase, record_run: RecordRun,
                 env: DistEnv | None = None) -> Finished:
    """One process, or one rank of a run started by torchrun with the [parallel] section's layout: fine-tune
    the base model.path names (`open_base` reads it; its weights are loaded on this rank's device);
    `record_run` writes the run's metadata."""
    env = env or DistEnv()
    dims = layout_dims(cfg, env.world_size)
    return run_on_world(env, dims, cfg.train.device, cfg.parallel.timeout_s,
                        lambda world: _run_finetune(cfg, open_base, record_run, world))


def _run_finetune(cfg: FinetuneConfig, open_base: OpenBase, record_run: RecordRun, world: World) -> Finished:
    run_dir = Path(world.from_main(str(resolve_run_dir(cfg))))  # only reads cfg.run
    resume_from = find_resume_checkpoint(run_dir, cfg.run.resume, report=world.is_main)
    device = world.device
    dtype_name = resolve_dtype(cfg.train.dtype, device)
    base = open_base(Path(cfg.model.path))
    model_cfg, tokenizer, chat = check_chat_format(base, cfg.data.chat_template)
    seq_len = resolve_seq_len(cfg.data.seq_len, model_cfg)
    check_layout(world.dims, cfg.parallel, model_cfg, seq_len)
    t = cfg.train
    with remedy_on_failure():
        d = cfg.data
        hf_options = HFOptions(d.split, d.subset, d.streaming)
        data = (build_sft_mixture(parse_mix(d.mix, ("format",)), tokenizer, seq_len, d.val_fraction, t.seed,
                                  d.pack, d.format, hf_options) if d.mix else
                build_sft_data(d.path, tokenizer, seq_len, d.val_fraction, t.seed, d.pack, d.format, hf_options))
    plan = plan_work(data.train["inputs"].shape[0], t.global_batch_size, t.steps, t.epochs, t.warmup_steps,
                     unit=world.dp_size * (t.micro_batch_size or 1))
    weights = base.load(device, base_dtype(cfg.model.dtype, dtype_name, cfg.finetune.method))
    model = build_finetune_model(weights, cfg.finetune, t.seed)
    if cfg.finetune.method == "qlora" and world.dims.dp_shard > 1:
        check_shardable(model, world.dims.dp_shard)  # before FSDP2 splits the NF4 base (its own error is an assertion)
    if t.fused_loss and type(model.lm_head) is not nn.Linear:
        raise ConfigError("train.fused_loss needs a plain output head; finetune.targets adapts lm_head")
    if t.fused_loss and model.config.final_logit_softcap is not None:
        raise ConfigError(f"train.fused_loss does not apply model.final_logit_softcap="
                          f"{model.config.final_logit_softcap} (Gemma 2); set train.fused_loss=false")
    schedule = lambda step: lr_at(step, t.lr, plan.warmup_steps, plan.steps, t.min_lr_ratio)
    # Every rank loaded the same weights and seeded the same adapters: no start-up broadcast (which altered
    # torchao's NF4 bases under DDP).
    trainer, parts = build_trainer(model, world, cfg.parallel, t, dtype_name, schedule, replicas_equal=True)
    loader = row_loader(data.train, plan.batch_size, t.seed, data.mixture)
    task = SFTTask(cfg, run_dir, device, model, trainer, loader, data, plan, chat, world)
    return run_adapter_task(cfg, task, run_dir, resume_from, trainer, model, parts, model_cfg, plan.steps,
                            base.path, chat.template, record_run, world)


def check_layout(dims: ParallelDims, p: ParallelSection, model_cfg: ModelConfig, seq_len: int) -> None:
    """The layout against the base model's shape and the resolved sequence length (known only once the base
    is open), before any weight is loaded."""
    dims.validate_model(model_cfg, p.pp_virtual_stages if dims.pp > 1 else 1)
    dims.validate_seq_len(seq_len, p.sequence_parallel)
    if dims.tp > 1 and p.sequence_parallel and seq_len % dims.tp:
        raise ConfigError(f"parallel.tp={dims.tp} must divide data.seq_len={seq_len} with "
                          "parallel.sequence_parallel=true (each rank holds an equal slice of the sequence)")


def run_adapter_task(cfg: Any, task: session.Task, run_dir: Path, resume_from: Path | None, trainer: Trainer,
                     model: nn.Module, parts: list[nn.Module], model_cfg: ModelConfig, steps: int, base_path: Path,
                     chat_template: str, record_run: RecordRun, world: World) -> Finished:
    """The driver for a method that trains a loaded base (SFT, alignment): checkpoints hold what the method
    trains (of this rank's pipeline stages under pp: `parts`, else of the plain `model`, not its DDP
    wrapper, so names do not depend on the layout), and the run directory gets the config, the base's
    tokenizer, the chat template and run.json."""

    def write_files(run_dir: Path) -> None:
        write_run_files(run_dir, cfg, base_path, chat_template)
        record_run(run_dir)

    method = cfg.finetune.method
    saved = ([saved_module(part, method) for part in parts] if world.dims.pp > 1
             else saved_module(model, method))
    driver = Driver(run_dir, resume_from, trainer, saved, model_cfg, steps, cfg.eval, cfg.checkpoint, cfg.log,
                    write_files, world.is_main, world.barrier, GuardSettings.of(cfg.train))
    return session.run(driver, task, model)


def write_run_files(run_dir: Path, cfg: FinetuneConfig, base_dir: Path, chat_template: str) -> None:
    """config.toml and the base's tokenizer files, with the chat template the run trains with as
    chat_template.jinja (which both our loader and `transformers` prefer to tokenizer_config's)."""
    write_config(run_dir, cfg)
    copy_tokenizer_files(tokenizer_dir(base_dir), run_dir)
    write_text_atomic(run_dir / CHAT_TEMPLATE_FILE, chat_template)


def micro_batches(batch: Batch, micro: int, device: torch.device) -> list[Batch]:
    micro = micro or batch["inputs"].shape[0]
    parts = {key: value.split(micro) for key, value in batch.items()}
    return [to_device({key: chunks[i] for key, chunks in parts.items()}, device)
            for i in range(len(parts["inputs"]))]


@dataclass
class SFTTask:
    """Supervised fine-tuning on packed chat rows (session.Task)."""

    cfg: FinetuneConfig
    run_dir: Path
    device: torch.device
    model: nn.Module
    trainer: Trainer
    loader: RowLoader | RowMixtureLoader
    data: SFTData
    plan: WorkPlan
    chat: ChatFormat
    world: World

    def describe(self) -> str:
        trainable, total = count_params(self.model)
        method = self.cfg.finetune.method
        extra = ""
        if method == "qlora":
            extra = f"; NF4 base {quantized_bits_per_param(self.model):.2f} bits/weight"
        val = self.data.val["inputs"].shape[0] if self.data.val is not None else 0
        where = self.world.describe()
        return (f"{method} fine-tuning on {where}: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters "
                f"train{extra}; {self.data.n_examples} examples ({self.data.n_truncated} cut to seq_len) in "
                f"{self.data.train['inputs'].shape[0]} train / {val} val rows"
                f"{'; ' + self.data.mixture.describe() if self.data.mixture else ''}; {self.plan.describe()}; "
                f"{self.chat.describe()}; run dir {self.run_dir}")

    def next_micro_batches(self, step: int) -> list[Batch]:
        # Adapter dropout draws from the global RNG: seeding it from (seed, step) makes a resumed run
        # repeat the uninterrupted one exactly without saving RNG state in the checkpoint.
        position = self.loader.samples_consumed // self.loader.batch_size
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + position)
        rows = self.loader.next_batch()  # the global batch, the same on every rank; this rank's share:
        mine = self.world.local_slice(self.loader.batch_size)
        return micro_batches({k: v[mine] for k, v in rows.items()}, self.cfg.train.micro_batch_size, self.device)

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(mb["inputs"].numel()) for mb in micro_batches)

    def log_fields(self, step: int, result: StepResult, seconds: float, tokens_per_s: float) -> dict[str, Any]:
        return {"loss_tokens": int(result.units.item()), "mem_gib": memory_gib(self.device)}

    def evaluate(self, step: int) -> dict[str, float] | None:
        if self.data.val is None:
            return None
        c = self.cfg.eval
        batches = [to_device(b, self.device) for b in eval_batches(self.data.val, c.batch_size, c.batches)]
        val_loss = self.trainer.evaluate(batches)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def summary(self, evaluation: dict[str, float] | None) -> str:
        return f"validation loss {evaluation['val_loss']:.4f}; " if evaluation is not None else ""

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "method": self.cfg.finetune.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])

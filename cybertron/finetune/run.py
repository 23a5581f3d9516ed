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

import torch
from torch import nn

from cybertron.data.chat_template import ChatFormat, remedy_on_failure, resolve_chat_format
from cybertron.data.sft import RowLoader, SFTData, build_sft_data, eval_batches
from cybertron.data.tokenizer import CHAT_TEMPLATE_FILE, TextTokenizer, copy_tokenizer_files
from cybertron.errors import ConfigError
from cybertron.finetune.config import FinetuneConfig
from cybertron.finetune.lora import count_params
from cybertron.finetune.model import BaseModel, OpenBase, base_dtype, build_finetune_model, saved_module
from cybertron.finetune.quant import quantized_bits_per_param
from cybertron.models.config import ModelConfig
from cybertron.parallel.data_only import DataParallel, run_on_ranks
from cybertron.parallel.runtime import DistEnv
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.epochs import WorkPlan, plan_work
from cybertron.train.metrics import MetricsLogger, ProgressDisplay, memory_gib
from cybertron.train.optim import build_optimizer
from cybertron.train.precision import autocast, resolve_dtype
from cybertron.train.schedule import lr_at
from cybertron.train.session import (
    RecordRun,
    announce_and_run,
    find_resume_checkpoint,
    resolve_run_dir,
    write_config,
)
from cybertron.train.trainer import Batch, LanguageModelStep, LoopHooks, StepResult, Trainer, fit, to_device

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


@dataclass
class FinetuneRun:
    cfg: FinetuneConfig
    run_dir: Path
    device: torch.device
    model_cfg: ModelConfig
    model: nn.Module
    trainer: Trainer
    loader: RowLoader
    data: SFTData
    plan: WorkPlan
    chat: ChatFormat
    logger: MetricsLogger
    display: ProgressDisplay
    dp: DataParallel


def run_finetune(cfg: FinetuneConfig, open_base: OpenBase, record_run: RecordRun,
                 env: DistEnv | None = None) -> FinetuneRun:
    """One process, or one rank of a data-parallel run started by torchrun: fine-tune the base model.path
    names (`open_base` reads it; its weights are loaded on this rank's device); `record_run` writes the run's
    metadata."""
    p = cfg.parallel
    return run_on_ranks(env or DistEnv(), cfg.train.device, p.data_parallel, p.timeout_s,
                        lambda dp, device: _run_finetune(cfg, open_base, record_run, dp, device))


def _run_finetune(cfg: FinetuneConfig, open_base: OpenBase, record_run: RecordRun, dp: DataParallel,
                  device: torch.device) -> FinetuneRun:
    run_dir = Path(dp.from_main(str(resolve_run_dir(cfg))))  # only reads cfg.run
    resume_from = find_resume_checkpoint(run_dir, cfg.run.resume)
    dtype_name = resolve_dtype(cfg.train.dtype, device)
    base = open_base(Path(cfg.model.path))
    model_cfg, tokenizer, chat = check_chat_format(base, cfg.data.chat_template)
    seq_len = resolve_seq_len(cfg.data.seq_len, model_cfg)
    t = cfg.train
    with remedy_on_failure():
        data = build_sft_data(cfg.data.path, tokenizer, seq_len, cfg.data.val_fraction, t.seed, cfg.data.pack)
    plan = plan_work(data.train["inputs"].shape[0], t.global_batch_size, t.steps, t.epochs, t.warmup_steps,
                     unit=dp.size * (t.micro_batch_size or 1))
    weights = base.load(device, base_dtype(cfg.model.dtype, dtype_name, cfg.finetune.method))
    model = build_finetune_model(weights, cfg.finetune, t.seed)
    trained = dp.wrap(model, lambda m: m)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    schedule = lambda step: lr_at(step, t.lr, plan.warmup_steps, plan.steps, t.min_lr_ratio)
    # Compiling the forward + loss needs the plain module (a DDP/FSDP wrapper is called, not traced, here).
    if t.fused_loss and type(model.lm_head) is not nn.Linear:
        raise ConfigError("train.fused_loss needs a plain output head; finetune.targets adapts lm_head")
    step_fn = LanguageModelStep(compile=t.compile and not dp.is_distributed, fused_loss=t.fused_loss)
    trainer = Trainer(trained, optimizer, step_fn, schedule, t.grad_clip,
                      autocast=lambda: autocast(dtype_name, device), collectives=dp.collectives())
    loader = RowLoader(data.train, plan.batch_size, seed=t.seed)
    start_step = 0
    if resume_from is not None:
        state = ckpt_io.load_checkpoint(resume_from, saved_module(model, cfg.finetune.method), optimizer)
        loader.load_state_dict(state["loader"])
        start_step = int(state["step"])
    if dp.is_main:
        write_run_files(run_dir, cfg, base.path, chat.template)
        record_run(run_dir)
    display = ProgressDisplay(plan.steps, cfg.log.progress, stream=dp.devnull_unless_main())
    logger = MetricsLogger(run_dir, display, cfg.log.tensorboard, enabled=dp.is_main)
    run = FinetuneRun(cfg, run_dir, device, model_cfg, model, trainer, loader, data, plan, chat, logger, display,
                      dp)
    announce_and_run(logger, display, resume_from, start_step, lambda: describe_run(run),
                     lambda: finetune_loop(run, start_step))
    return run


def write_run_files(run_dir: Path, cfg: FinetuneConfig, base_dir: Path, chat_template: str) -> None:
    """config.toml and the base's tokenizer files, with the chat template the run trains with as
    chat_template.jinja (which both our loader and `transformers` prefer to tokenizer_config's)."""
    write_config(run_dir, cfg)
    copy_tokenizer_files(base_dir, run_dir)
    (run_dir / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")


def describe_run(run: FinetuneRun) -> str:
    trainable, total = count_params(run.model)
    method = run.cfg.finetune.method
    extra = ""
    if method == "qlora":
        extra = f"; NF4 base {quantized_bits_per_param(run.model):.2f} bits/weight"
    val = run.data.val["inputs"].shape[0] if run.data.val is not None else 0
    where = (f"{run.dp.size} ranks ({run.cfg.parallel.data_parallel})" if run.dp.is_distributed
             else str(run.device))
    return (f"{method} fine-tuning on {where}: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters "
            f"train{extra}; {run.data.n_examples} examples ({run.data.n_truncated} cut to seq_len) in "
            f"{run.data.train['inputs'].shape[0]} train / {val} val rows; {run.plan.describe()}; "
            f"{run.chat.describe()}; run dir {run.run_dir}")


def log_eval(run: FinetuneRun, step: int) -> float | None:
    if run.data.val is None:
        return None
    c = run.cfg.eval
    batches = [to_device(b, run.device) for b in eval_batches(run.data.val, c.batch_size, c.batches)]
    val_loss = run.trainer.evaluate(batches)
    run.logger.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
    return val_loss


def save(run: FinetuneRun, step: int) -> Path:
    method = run.cfg.finetune.method
    return ckpt_io.save_checkpoint(run.run_dir, step, saved_module(run.model, method), run.trainer.optimizer,
                                   {"loader": run.loader.state_dict(), "method": method}, run.model_cfg,
                                   keep=run.cfg.checkpoint.keep, is_main=run.dp.is_main, barrier=run.dp.barrier)


def micro_batches(batch: Batch, micro: int, device: torch.device) -> list[Batch]:
    micro = micro or batch["inputs"].shape[0]
    parts = {key: value.split(micro) for key, value in batch.items()}
    return [to_device({key: chunks[i] for key, chunks in parts.items()}, device)
            for i in range(len(parts["inputs"]))]


def finetune_loop(run: FinetuneRun, start_step: int) -> None:
    c = run.cfg
    total = run.plan.steps

    def on_log(step: int, result: StepResult, seconds: float, tokens: int) -> None:
        run.logger.log({"step": step, "loss": result.loss.item(), "lr": run.trainer.lr_at(step - 1),
                        "grad_norm": result.grad_norm.item(), "tokens_per_s": tokens / max(seconds, 1e-9),
                        "loss_tokens": int(result.units.item()), "mem_gib": memory_gib(run.device)})

    def on_step_end(step: int) -> None:
        if c.eval.every and step % c.eval.every == 0 and step != total:
            log_eval(run, step)
        if c.checkpoint.every and step % c.checkpoint.every == 0 and step != total:
            save(run, step)

    if start_step == 0:
        log_eval(run, 0)
    def next_batches() -> list[Batch]:
        # Adapter dropout draws from the global RNG: seeding it from (seed, step) makes a resumed run
        # repeat the uninterrupted one exactly without saving RNG state in the checkpoint.
        step = run.loader.samples_consumed // run.loader.batch_size
        torch.manual_seed(c.train.seed * 1_000_003 + step)
        rows = run.loader.next_batch()  # the global batch, the same on every rank; this rank's share:
        mine = run.dp.local_slice(run.loader.batch_size)
        return micro_batches({k: v[mine] for k, v in rows.items()}, c.train.micro_batch_size, run.device)

    fit(run.trainer, start_step, total, LoopHooks(next_batches, on_log, on_step_end, log_every=c.log.every))
    val_loss = log_eval(run, total)
    path = save(run, total)
    summary = f"validation loss {val_loss:.4f}; " if val_loss is not None else ""
    run.display.message(f"done: step {total}, {summary}checkpoint saved to {path}")

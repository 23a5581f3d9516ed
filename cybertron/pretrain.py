"""Pretraining (`cybertron train`): validate -> mesh -> data -> model -> parallelize -> Trainer loop ->
checkpoints.

One process trains on one device; under torchrun (or `--nproc N`) every rank runs this same code with the
layout of the [parallel] section (see cybertron/parallel/). The command (cybertron/commands/train.py) parses
the config and hands it here.

Each stage is a small build_* function so benchmarks and tests reuse them."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cybertron.config import TrainConfig, raise_first_failure, validate_shared_sections
from cybertron.data.loader import PackedLoader, iter_eval_batches
from cybertron.data.prepare import PreparedData, prepare_data
from cybertron.errors import ConfigError
from cybertron.models.config import ModelConfig
from cybertron.models.llama import Transformer, build_model
from cybertron.models.presets import preset_config
from cybertron.parallel.dims import dp_mesh
from cybertron.parallel.runtime import DistEnv, init_distributed, layout_dims, shutdown_distributed
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.float8 import convert_to_float8, float8_compile_options, validate_float8
from cybertron.train.metrics import (
    MetricsLogger,
    ProgressDisplay,
    device_peak_flops,
    flops_per_token,
    memory_gib,
)
from cybertron.train.optim import build_optimizer
from cybertron.train.precision import autocast, resolve_device, resolve_dtype
from cybertron.train.schedule import lr_at
from cybertron.train.session import (
    RecordRun,
    announce_and_run,
    find_resume_checkpoint,
    resolve_run_dir,
    write_config,
)
from cybertron.train.trainer import Batch, LanguageModelStep, LoopHooks, StepResult, Trainer, fit, to_device


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Reject impossible values before any work starts; each message names the key."""
    t, d = cfg.train, cfg.data
    validate_shared_sections(cfg)
    raise_first_failure([
        (d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}"),
        (0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}"),
    ])
    resolve_dtype(t.dtype, torch.device("cpu"))
    validate_float8(t.fp8, resolve_device(t.device), (t.micro_batch_size or t.global_batch_size) * d.seq_len)
    if t.fused_loss and world_size > 1:
        raise ConfigError("train.fused_loss runs on one process for now (FSDP/TP/PP wrap the head); "
                          f"got {world_size} ranks")
    if t.fp8 != "none" and world_size > 1:
        # Float8Linear under FSDP/TP needs float8-aware all-gathers and TP styles (torchtitan's converters):
        # not wired into parallel/ yet, so refuse rather than silently train in bf16.
        raise ConfigError(f"train.fp8={t.fp8} runs on one process only for now; got {world_size} ranks "
                          "(use train.fp8=none with a parallel layout)")
    if not cfg.model.init_from:
        try:
            preset_config(cfg.model.preset)
        except ValueError as err:
            raise ConfigError(f"model.preset: {err}") from err
    # The layout against the model's shape; the vocabulary is the tokenizer's unless one is given.
    layout_dims(cfg, world_size, build_model_config(cfg, cfg.model.vocab_size or cfg.data.vocab_size,
                                                    check_vocab=False))


def build_data(cfg: TrainConfig) -> PreparedData:
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else Path.home() / ".cache" / "cybertron"
    return prepare_data(cfg.data.path or None, cfg.data.text_field, cfg.data.tokenizer or None,
                        cfg.data.vocab_size, cache_dir, cfg.data.val_fraction, cfg.train.seed,
                        cfg.data.tokenizer_train_chars)


def build_model_config(cfg: TrainConfig, vocab_size: int, check_vocab: bool = True) -> ModelConfig:
    m = cfg.model
    if m.init_from:
        from cybertron.models.hf import read_hf_config

        model_cfg = read_hf_config(m.init_from)
    else:
        overrides = {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                                "max_seq_len", "tie_embeddings")}
        model_cfg = preset_config(m.preset, vocab_size=m.vocab_size or vocab_size, **overrides)
    try:
        model_cfg.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if check_vocab and model_cfg.vocab_size < vocab_size:
        raise ConfigError(f"model vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is above the model's maximum sequence length "
                          f"{model_cfg.max_seq_len}; lower data.seq_len or raise model.max_seq_len")
    return model_cfg


def build_weights(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> Transformer:
    if cfg.model.init_from:
        from cybertron.models.hf import load_hf_model

        return load_hf_model(cfg.model.init_from, device=device)
    return build_model(model_cfg, device=device, seed=cfg.train.seed)


def split_micro_batches(inputs: torch.Tensor, targets: torch.Tensor, micro: int, device) -> list[Batch]:
    micro = micro or inputs.shape[0]
    return [to_device({"inputs": i, "labels": t}, device)
            for i, t in zip(inputs.split(micro), targets.split(micro))]


@dataclass
class RunState:
    """What is built once per run and shared by the loop's hooks."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    model_cfg: ModelConfig
    model: torch.nn.Module
    trainer: Trainer
    loader: PackedLoader
    data: PreparedData
    logger: MetricsLogger
    display: ProgressDisplay
    flops_per_token: float
    peak_flops: float | None
    parts: list[torch.nn.Module] | None = None  # what checkpoints save (pipeline stages held by this rank)
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None
    layout: str = "single process"


def run_training(cfg: TrainConfig, record_run: RecordRun, env: DistEnv | None = None) -> RunState:
    """Pretrain on this process (one of the ranks under torchrun); `record_run` writes the run's metadata."""
    env = env or DistEnv()
    dims = layout_dims(cfg, env.world_size)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dims.is_distributed:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    mesh = init_distributed(env, dims, device, cfg.parallel.timeout_s)
    try:
        run = _run(cfg, record_run, env, dims, mesh, device)
    except BaseException:
        shutdown_distributed(clean=False)  # the other ranks may be inside a collective: no barrier
        raise
    shutdown_distributed()
    return run


def _run(cfg: TrainConfig, record_run: RecordRun, env: DistEnv, dims, mesh, device: torch.device) -> RunState:
    barrier = _barrier if mesh is not None else (lambda: None)
    run_dir = resolve_run_dir(cfg) if mesh is None else Path(_from_main(str(resolve_run_dir(cfg))))
    resume_from = find_resume_checkpoint(run_dir, cfg.run.resume)
    dtype_name = resolve_dtype(cfg.train.dtype, device)
    with _main_first(env.is_main, barrier):  # rank 0 tokenizes into the cache; the others then read it
        data = build_data(cfg)
    model_cfg = build_model_config(cfg, data.tokenizer.vocab_size)
    dims.validate_model(model_cfg, cfg.parallel.pp_virtual_stages if dims.pp > 1 else 1)
    model = build_weights(cfg, model_cfg, device)  # full weights on every rank: identical to one process
    trainer, parts = build_trainer(cfg, model, dims, mesh, dtype_name, device)
    t = cfg.train
    dp_rank = dp_mesh(mesh).get_local_rank() if mesh is not None else 0
    loader = PackedLoader(data.shards.train, cfg.data.seq_len, t.global_batch_size, dp_rank=dp_rank,
                          dp_size=dims.dp, seed=t.seed)
    start_step = 0
    if resume_from is not None:
        state = ckpt_io.load_checkpoint(resume_from, parts, trainer.optimizer)
        loader.load_state_dict(state["loader"])
        start_step = int(state["step"])
    if env.is_main:
        write_run_files(run_dir, cfg, data)
        record_run(run_dir)
    display = ProgressDisplay(t.steps, cfg.log.progress,
                              stream=None if env.is_main else open(os.devnull, "w"))  # noqa: SIM115
    logger = MetricsLogger(run_dir, display, cfg.log.tensorboard, enabled=env.is_main)
    run = RunState(cfg, run_dir, device, model_cfg, trainer.model, trainer, loader, data, logger, display,
                   flops_per_token(model_cfg, cfg.data.seq_len), device_peak_flops(device), parts,
                   env.is_main, barrier, dims.describe() if dims.is_distributed else "single process")
    announce_and_run(logger, display, resume_from, start_step, lambda: describe_run(run),
                     lambda: train_loop(run, start_step))
    return run


def build_trainer(cfg: TrainConfig, model: Transformer, dims, mesh, dtype_name: str,
                  device: torch.device) -> tuple[Trainer, list[torch.nn.Module]]:
    """The Trainer for the layout: the plain model on one process, else the parallelized one."""
    t = cfg.train
    schedule = lambda step: lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
    amp = lambda: autocast(dtype_name, device)
    if mesh is None:
        if t.fp8 != "none":
            convert_to_float8(model, t.fp8)  # before activation checkpointing and compile wrap the Linears
        if cfg.parallel.activation_checkpoint != "none":
            from cybertron.parallel.activation_checkpoint import apply_activation_checkpoint

            apply_activation_checkpoint(model, cfg.parallel.activation_checkpoint)
        optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
        # one process: forward + loss compiled together
        step_fn = LanguageModelStep(compile=t.compile, fused_loss=t.fused_loss,
                                    compile_options=float8_compile_options(t.fp8))
        return Trainer(model, optimizer, step_fn, schedule, t.grad_clip, autocast=amp), [model]
    assert t.fp8 == "none", "validate() refuses train.fp8 with a parallel layout"
    from cybertron.parallel.apply import build_parallel_optimizer, parallelize

    param_dtype = torch.bfloat16 if dtype_name == "bf16" else None
    par = parallelize(model, dims, mesh, cfg.parallel, compile_blocks=t.compile, param_dtype=param_dtype)
    optimizer = build_parallel_optimizer(par, dims, mesh, t)
    trainer = Trainer(par.model, optimizer, par.step_fn, schedule, t.grad_clip, autocast=amp,
                      collectives=par.collectives, strategy=par.strategy)
    return trainer, par.parts


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _from_main(value: str) -> str:
    """Rank 0's value on every rank (e.g. a timestamped run directory)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _main_first(is_main: bool, barrier: Callable[[], None]):
    if not is_main:
        barrier()
    yield
    if is_main:
        barrier()


def write_run_files(run_dir: Path, cfg: TrainConfig, data: PreparedData) -> None:
    write_config(run_dir, cfg)
    data.tokenizer.save(run_dir)


def describe_run(run: RunState) -> str:
    n_params = run.model_cfg.num_params()
    shards = run.data.shards
    cached = "cached" if shards.cache_hit else "tokenized now"
    return (f"model {n_params / 1e6:.1f}M parameters on {run.device} ({run.layout}); data {len(shards.train):,} "
            f"train / {len(shards.val):,} val tokens ({cached}); vocab {run.data.tokenizer.vocab_size}; "
            f"run dir {run.run_dir}")


def eval_batches(run: RunState) -> list[Batch]:
    c = run.cfg
    return [to_device({"inputs": i, "labels": t}, run.device)
            for i, t in iter_eval_batches(run.data.shards.val, c.data.seq_len, c.eval.batch_size, c.eval.batches)]


def log_eval(run: RunState, step: int) -> float:
    val_loss = run.trainer.evaluate(eval_batches(run))
    run.logger.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
    return val_loss


def save(run: RunState, step: int) -> Path:
    state = {"loader": run.loader.state_dict()}
    return ckpt_io.save_checkpoint(run.run_dir, step, run.parts or run.model, run.trainer.optimizer, state,
                                   run.model_cfg, keep=run.cfg.checkpoint.keep, is_main=run.is_main,
                                   barrier=run.barrier)


def train_loop(run: RunState, start_step: int) -> None:
    c = run.cfg
    total = c.train.steps

    def next_micro_batches() -> list[Batch]:
        inputs, targets = run.loader.next_batch()
        return split_micro_batches(inputs, targets, c.train.micro_batch_size, run.device)

    def on_log(step: int, result: StepResult, seconds: float, tokens: int) -> None:
        tokens_per_s = tokens / max(seconds, 1e-9)
        mfu = tokens_per_s * run.flops_per_token / run.peak_flops if run.peak_flops else None
        run.logger.log({"step": step, "loss": result.loss.item(), "lr": run.trainer.lr_at(step - 1),
                        "grad_norm": result.grad_norm.item(), "tokens_per_s": tokens_per_s, "mfu": mfu,
                        "mem_gib": memory_gib(run.device), "tokens": step * c.train.global_batch_size * c.data.seq_len})

    def on_step_end(step: int) -> None:
        if c.eval.every and step % c.eval.every == 0 and step != total:
            log_eval(run, step)
        if c.checkpoint.every and step % c.checkpoint.every == 0 and step != total:
            save(run, step)

    if start_step == 0:
        log_eval(run, 0)
    fit(run.trainer, start_step, total, LoopHooks(next_micro_batches, on_log, on_step_end, log_every=c.log.every))
    val_loss = log_eval(run, total)
    path = save(run, total)
    run.display.message(f"done: step {total}, validation loss {val_loss:.4f} (perplexity "
                        f"{math.exp(min(val_loss, 50.0)):.2f}); checkpoint saved to {path}")

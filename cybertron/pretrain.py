"""Pretraining (`cybertron train`): validate -> mesh -> data -> model -> parallelize -> Trainer loop ->
checkpoints.

One process trains on one device; under torchrun (or `--nproc N`) every rank runs this same code with the
layout of the [parallel] section (see cybertron/parallel/). The command (cybertron/commands/train.py) parses
the config and hands it here.

Each stage is a small build_* function so benchmarks and tests reuse them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cybertron.config import TrainConfig, raise_first_failure, validate_shared_sections
from cybertron.data.hf import HFOptions
from cybertron.data.loader import PackedLoader, iter_eval_batches
from cybertron.data.mixture import MixtureLoader
from cybertron.data.prepare import PreparedData, mix_parts, prepare_data
from cybertron.errors import ConfigError
from cybertron.models.config import ModelConfig
from cybertron.models.llama import Transformer, build_model
from cybertron.models.presets import preset_config
from cybertron.parallel.build_trainer import build_trainer as build_layout_trainer
from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.runtime import DistEnv, layout_dims
from cybertron.parallel.world import World, run_on_world
from cybertron.train import session
from cybertron.train.float8 import validate_float8
from cybertron.train.guard import GuardSettings
from cybertron.train.metrics import (
    device_peak_flops,
    flops_per_token,
    memory_gib,
)
from cybertron.train.precision import resolve_device, resolve_dtype
from cybertron.train.schedule import lr_at
from cybertron.train.session import Driver, Finished, RecordRun, find_resume_checkpoint, resolve_run_dir, write_config
from cybertron.train.trainer import Batch, StepResult, Trainer, to_device


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Reject impossible values before any work starts; each message names the key."""
    t, d = cfg.train, cfg.data
    validate_shared_sections(cfg)
    raise_first_failure([
        (d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}"),
        (0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}"),
        (not (d.path and d.mix), f"give data.path ({d.path}) or data.mix, not both"),
    ])
    mix_parts(d.mix, d.text_field)
    resolve_dtype(t.dtype, torch.device("cpu"))
    validate_float8(t.fp8, resolve_device(t.device), (t.micro_batch_size or t.global_batch_size) * d.seq_len)
    if cfg.parallel.pp > 1:
        # The pipeline's last stage computes the loss from its logits (PipelineLoss), outside the model.
        raise_first_failure([
            (not t.fused_loss, "train.fused_loss does not run with pipeline parallelism (parallel.pp > 1) yet"),
            (t.fp8 == "none", f"train.fp8={t.fp8} does not run with pipeline parallelism (parallel.pp > 1) yet"),
        ])
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
    d = cfg.data
    return prepare_data(d.path or None, d.text_field, d.tokenizer or None, d.vocab_size, cache_dir,
                        d.val_fraction, cfg.train.seed, d.tokenizer_train_chars, verify=d.verify,
                        hf_options=HFOptions(d.split, d.subset, d.streaming), mix=mix_parts(d.mix, d.text_field))


def build_loader(cfg: TrainConfig, data: PreparedData, dp_rank: int = 0,
                 dp_size: int = 1) -> PackedLoader | MixtureLoader:
    """One source: PackedLoader; a data.mix: MixtureLoader over every source's train tokens."""
    d, t = cfg.data, cfg.train
    if len(data.parts) == 1:
        return PackedLoader(data.shards.train, d.seq_len, t.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            seed=t.seed)
    return MixtureLoader([p.train for p in data.parts], data.weights, d.seq_len, t.global_batch_size, dp_rank,
                         dp_size, seed=t.seed, names=[str(m.get("path")) for m in d.mix])


def build_model_config(cfg: TrainConfig, vocab_size: int, check_vocab: bool = True) -> ModelConfig:
    m = cfg.model
    if m.init_from:
        from cybertron.models.hf import read_hf_config

        model_cfg = read_hf_config(m.init_from)
    else:
        overrides = {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                                "max_seq_len", "tie_embeddings", "n_experts", "top_k",
                                                "moe_ffn_dim", "aux_loss_coef", "bias_update_rate")}
        overrides["sliding_window"] = m.sliding_window or None  # 0 means off, as HF's Qwen2-MoE writes it
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


def run_training(cfg: TrainConfig, record_run: RecordRun, env: DistEnv | None = None) -> Finished:
    """Pretrain on this process (one of the ranks under torchrun); `record_run` writes the run's metadata."""
    env = env or DistEnv()
    dims = layout_dims(cfg, env.world_size)
    return run_on_world(env, dims, cfg.train.device, cfg.parallel.timeout_s,
                        lambda world: _run(cfg, record_run, world))


def _run(cfg: TrainConfig, record_run: RecordRun, world: World) -> Finished:
    run_dir = Path(world.from_main(str(resolve_run_dir(cfg))))
    resume_from = find_resume_checkpoint(run_dir, cfg.run.resume, report=world.is_main)
    dtype_name = resolve_dtype(cfg.train.dtype, world.device)
    with world.main_first():  # rank 0 tokenizes into the cache; the others then read it
        data = build_data(cfg)
    if world.is_main:
        for note in data.notes:
            print(note, flush=True)
    model_cfg = build_model_config(cfg, data.tokenizer.vocab_size)
    dims = world.dims
    dims.validate_model(model_cfg, cfg.parallel.pp_virtual_stages if dims.pp > 1 else 1)
    model = build_weights(cfg, model_cfg, world.device)  # full weights on every rank: identical to one process
    trainer, parts = build_trainer(cfg, model, dims, world.mesh, dtype_name, world.device)
    t = cfg.train
    loader = build_loader(cfg, data, world.dp_rank, dims.dp)
    task = PretrainTask(cfg, run_dir, world.device, model_cfg, trainer, loader, data,
                        dims.describe() if dims.is_distributed else "single process")

    def write_run_files(run_dir: Path) -> None:
        write_config(run_dir, cfg)
        data.tokenizer.save(run_dir)
        record_run(run_dir)

    driver = Driver(run_dir, resume_from, trainer, parts, model_cfg, t.steps, cfg.eval, cfg.checkpoint, cfg.log,
                    write_run_files, world.is_main, world.barrier, GuardSettings.of(t))
    return session.run(driver, task, model)


def build_trainer(cfg: TrainConfig, model: Transformer, dims: ParallelDims | None, mesh, dtype_name: str,
                  device: torch.device) -> tuple[Trainer, list[torch.nn.Module]]:
    """The Trainer for the layout (parallel/build_trainer.py): the plain model on one process (dims None),
    else the parallelized one."""
    t = cfg.train
    schedule = lambda step: lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
    dims = dims or ParallelDims()
    world = World(DistEnv(world_size=dims.world_size), dims, mesh, device)
    return build_layout_trainer(model, world, cfg.parallel, t, dtype_name, schedule)


@dataclass
class PretrainTask:
    """Next-token prediction on packed token windows (session.Task)."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    model_cfg: ModelConfig
    trainer: Trainer
    loader: PackedLoader | MixtureLoader
    data: PreparedData
    layout: str = "single process"

    def __post_init__(self) -> None:
        self.flops_per_token = flops_per_token(self.model_cfg, self.cfg.data.seq_len)
        self.peak_flops = device_peak_flops(self.device)

    def describe(self) -> str:
        n_params = self.model_cfg.num_params()
        data = self.data
        cached = "cached" if all(p.cache_hit for p in data.parts) else "tokenized now"
        mixed = f" from {len(data.parts)} sources" if len(data.parts) > 1 else ""
        return (f"model {n_params / 1e6:.1f}M parameters on {self.device} ({self.layout}); data "
                f"{data.train_tokens:,} train / {len(data.val):,} val tokens{mixed} ({cached}); vocab "
                f"{self.data.tokenizer.vocab_size}; run dir {self.run_dir}")

    def next_micro_batches(self, step: int) -> list[Batch]:
        inputs, targets = self.loader.next_batch()
        return split_micro_batches(inputs, targets, self.cfg.train.micro_batch_size, self.device)

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(mb["inputs"].numel()) for mb in micro_batches)

    def log_fields(self, step: int, result: StepResult, seconds: float, tokens_per_s: float) -> dict[str, Any]:
        c = self.cfg
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
        return {"mfu": mfu, "mem_gib": memory_gib(self.device),
                "tokens": step * c.train.global_batch_size * c.data.seq_len}

    def evaluate(self, step: int) -> dict[str, float]:
        c = self.cfg
        batches = [to_device({"inputs": i, "labels": t}, self.device)
                   for i, t in iter_eval_batches(self.data.val, c.data.seq_len, c.eval.batch_size,
                                                 c.eval.batches)]
        val_loss = self.trainer.evaluate(batches)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def summary(self, evaluation: dict[str, float] | None) -> str:
        assert evaluation is not None  # pretraining always holds out data.val_fraction
        return f"validation loss {evaluation['val_loss']:.4f} (perplexity {evaluation['val_ppl']:.2f}); "

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])

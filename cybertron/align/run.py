"""Alignment (`cybertron align`): preference optimisation (dpo, ipo, simpo, orpo), reward models and GRPO on
the one Trainer.

The methods differ by step function and data only (ARCHITECTURE.md rule 6): the loop, the optimizer,
checkpoints (adapters alone under LoRA), resume and logging are those of `cybertron finetune`. The command
(cybertron/commands/align.py) opens the base (and a reward-model run) through runs.py and hands it here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cybertron.align.config import AlignConfig
from cybertron.align.dpo import PreferenceStep, evaluate_metrics, pair_batches, reference_logprobs
from cybertron.align.grpo import (
    GRPOStep,
    RolloutStats,
    generate_rollouts,
    group_advantages,
    rollout_rows,
    rollout_stats,
    rollout_sums,
    row_batches,
    token_logprobs,
)
from cybertron.align.preference_data import build_preference_data, read_prompts, split
from cybertron.align.reward import RewardModel, RewardStep
from cybertron.align.rewards import RewardModelLoader, load_reward
from cybertron.data.chat_template import ChatFormat, remedy_on_failure, resolve_chat_format
from cybertron.data.escapes import decode_escapes
from cybertron.data.sft import RowLoader
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import ConfigError
from cybertron.finetune.lora import count_params
from cybertron.finetune.model import OpenBase, base_dtype, build_finetune_model, saved_module
from cybertron.finetune.run import resolve_seq_len, write_run_files
from cybertron.models.config import ModelConfig
from cybertron.parallel.data_only import DataParallel, run_on_ranks
from cybertron.parallel.runtime import DistEnv
from cybertron.serve.engine import Engine
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.epochs import WorkPlan, plan_work
from cybertron.train.metrics import MetricsLogger, ProgressDisplay, memory_gib
from cybertron.train.optim import build_optimizer
from cybertron.train.precision import autocast, resolve_dtype
from cybertron.train.schedule import lr_at
from cybertron.train.session import RecordRun, announce_and_run, find_resume_checkpoint, resolve_run_dir
from cybertron.train.trainer import Batch, LoopHooks, StepResult, Trainer, fit, to_device

KV_BLOCK_SIZE = 16


@dataclass
class AlignRun:
    cfg: AlignConfig
    run_dir: Path
    device: torch.device
    model_cfg: ModelConfig
    tokenizer: TextTokenizer
    model: nn.Module  # the plain module (what generates and what checkpoints save); trainer.model may wrap it
    trainer: Trainer
    loader: RowLoader
    logger: MetricsLogger
    display: ProgressDisplay
    description: str
    dp: DataParallel
    plan: WorkPlan
    chat: ChatFormat
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific state (data, engine, reward)


def run_align(cfg: AlignConfig, open_base: OpenBase, record_run: RecordRun, env: DistEnv | None = None,
              reward_model: RewardModelLoader | None = None) -> AlignRun:
    """One process, or one rank of a data-parallel run started by torchrun: align the base model.path names
    (`open_base` reads it; its weights are loaded on this rank's device); `record_run` writes the run's
    metadata; `reward_model` loads a reward-model run given as align.reward."""
    p = cfg.parallel
    return run_on_ranks(env or DistEnv(), cfg.train.device, p.data_parallel, p.timeout_s,
                        lambda dp, device: _run_align(cfg, open_base, record_run, reward_model, dp, device))


def _run_align(cfg: AlignConfig, open_base: OpenBase, record_run: RecordRun,
               reward_model: RewardModelLoader | None, dp: DataParallel, device: torch.device) -> AlignRun:
    """Build everything (data and reference log-probabilities first, so bad input fails before training),
    resume if asked, and run the method's loop."""
    run_dir = Path(dp.from_main(str(resolve_run_dir(cfg))))
    resume_from = find_resume_checkpoint(run_dir, cfg.run.resume)
    dtype_name = resolve_dtype(cfg.train.dtype, device)
    base = open_base(Path(cfg.model.path))
    model_cfg, tokenizer = base.config, base.tokenizer
    # Chat-message records render through it; the run dir keeps it for generate/serve/export either way.
    chat = resolve_chat_format(tokenizer.chat_template, cfg.data.chat_template)
    tokenizer.chat_template = chat.template
    seq_len = resolve_seq_len(cfg.data.seq_len, model_cfg)
    method, t = cfg.align.method, cfg.train
    amp = lambda: autocast(dtype_name, device)
    with remedy_on_failure():
        if method == "grpo":  # prompts and the reward before the model
            setup = _grpo_setup(cfg, tokenizer, seq_len, device, reward_model)
        else:
            setup = _preference_setup(cfg, tokenizer, seq_len)
    n_rows = next(iter(setup["train"].values())).shape[0]
    plan = plan_work(n_rows, t.global_batch_size, t.steps, t.epochs, t.warmup_steps,
                     unit=dp.size * (t.micro_batch_size or 1),
                     steps_per_batch=cfg.align.updates_per_rollout if method == "grpo" else 1)
    wrap = (lambda backbone: RewardModel(backbone, seed=t.seed)) if method == "reward" else None
    weights = base.load(device, base_dtype(cfg.model.dtype, dtype_name, cfg.finetune.method))
    model = build_finetune_model(weights, cfg.finetune, t.seed, wrap=wrap)
    # References come from the weights as loaded: before a resumed checkpoint overwrites them, and before
    # data-parallel wrapping (every rank computes the same values, with no communication).
    if method == "grpo":
        setup.update(_grpo_model_state(cfg, model, tokenizer, device, seq_len, plan.batch_size // dp.size))
    elif getattr(setup["step"], "needs_reference", False):
        micro = t.micro_batch_size or t.global_batch_size
        setup["train"] = _shared_reference(dp, model, setup["train"], micro, device, amp)
        if setup["val"] is not None:
            setup["val"] = _shared_reference(dp, model, setup["val"], micro, device, amp)
    trained = dp.wrap(model, lambda m: m.model if isinstance(m, RewardModel) else m)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    schedule = lambda step: lr_at(step, t.lr, plan.warmup_steps, plan.steps, t.min_lr_ratio)
    trainer = Trainer(trained, optimizer, setup["step"], schedule, t.grad_clip, autocast=amp,
                      collectives=dp.collectives())
    loader = RowLoader(setup["train"], plan.batch_size, seed=t.seed)
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
    run = AlignRun(cfg, run_dir, device, model_cfg, tokenizer, model, trainer, loader, logger, display,
                   setup["describe"], dp, plan, chat, setup)
    loop = grpo_loop if method == "grpo" else preference_loop
    announce_and_run(logger, display, resume_from, start_step, lambda: describe_run(run),
                     lambda: loop(run, start_step))
    return run


def _shared_reference(dp: DataParallel, model: nn.Module, rows: Batch, micro: int, device: torch.device,
                      amp: Callable) -> Batch:
    """Reference log-probabilities of every pair, each rank computing a share and all of them gathering the
    rest (the same values as one process: the model is not wrapped yet, so no rank waits on another)."""
    n = rows["chosen_ids"].shape[0]
    mine = dp.row_share(n)
    if mine.start == mine.stop:  # more ranks than pairs: nothing to compute here, only to gather
        part = {"ref_chosen": torch.zeros(0), "ref_rejected": torch.zeros(0)}
    else:
        part = reference_logprobs(model, {k: v[mine] for k, v in rows.items()}, micro, device, amp)
    return {**rows, "ref_chosen": dp.gather_rows(part["ref_chosen"], n),
            "ref_rejected": dp.gather_rows(part["ref_rejected"], n)}


def describe_run(run: AlignRun) -> str:
    trainable, total = count_params(run.model)
    c = run.cfg
    where = f"{run.dp.size} ranks ({c.parallel.data_parallel})" if run.dp.is_distributed else str(run.device)
    work = (run.plan.describe("prompts", "rollout") if c.align.method == "grpo"
            else run.plan.describe("pairs"))
    return (f"{c.align.method} with {c.finetune.method} weights on {where}: {trainable / 1e6:.2f}M of "
            f"{total / 1e6:.1f}M parameters train; {run.description}; {work}; {run.chat.describe()}; "
            f"run dir {run.run_dir}")


def _log_step(run: AlignRun, step: int, result: StepResult, seconds: float, tokens: int,
              extra: dict[str, float] | None = None) -> None:
    record = {"step": step, "loss": result.loss.item(), "lr": run.trainer.lr_at(step - 1),
              "grad_norm": result.grad_norm.item(), "tokens_per_s": tokens / max(seconds, 1e-9),
              **{k: v.item() for k, v in result.metrics.items()}, **(extra or {}),
              "mem_gib": memory_gib(run.device)}
    run.logger.log(record)


def _save(run: AlignRun, step: int) -> Path:
    method = run.cfg.finetune.method
    return ckpt_io.save_checkpoint(run.run_dir, step, saved_module(run.model, method), run.trainer.optimizer,
                                   {"loader": run.loader.state_dict(), "method": method,
                                    "align_method": run.cfg.align.method}, run.model_cfg,
                                   keep=run.cfg.checkpoint.keep, is_main=run.dp.is_main, barrier=run.dp.barrier)


def _split_rows(rows: Batch, micro: int, device: torch.device, batches: Callable[[Batch, int], list[Batch]]
                ) -> list[Batch]:
    n = next(iter(rows.values())).shape[0]
    return [to_device(b, device) for b in batches(rows, micro or n)]


# ---- preference pairs: dpo, ipo, simpo, orpo, reward -------------------------------------------------------

def _preference_setup(cfg: AlignConfig, tokenizer: TextTokenizer, seq_len: int) -> dict[str, Any]:
    a = cfg.align
    data = build_preference_data(cfg.data.path, tokenizer, seq_len, cfg.data.val_fraction, cfg.train.seed)
    step = RewardStep() if a.method == "reward" else PreferenceStep(
        a.method, a.beta, a.label_smoothing, a.simpo_beta, a.simpo_gamma, a.orpo_lambda)
    n_val = data.val["chosen_ids"].shape[0] if data.val is not None else 0
    describe = (f"{data.n_pairs} preference pairs ({data.n_truncated} cut to seq_len {seq_len}): "
                f"{data.n_pairs - n_val} train / {n_val} val")
    return {"step": step, "train": data.train, "val": data.val, "describe": describe}


def log_preference_eval(run: AlignRun, step: int) -> dict[str, float] | None:
    val = run.extra["val"]
    if val is None:
        return None
    e = run.cfg.eval
    batches = [to_device(b, run.device) for b in pair_batches(val, e.batch_size)[:e.batches]]
    metrics = evaluate_metrics(run.trainer, batches)
    run.logger.log({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
    return metrics


def preference_loop(run: AlignRun, start_step: int) -> None:
    c = run.cfg
    total = run.plan.steps

    def next_batches() -> list[Batch]:
        rows = run.loader.next_batch()  # the global batch (the same on every rank); this rank's share:
        mine = run.dp.local_slice(run.loader.batch_size)
        return _split_rows({k: v[mine] for k, v in rows.items()}, c.train.micro_batch_size, run.device,
                           pair_batches)

    def on_step_end(step: int) -> None:
        if c.eval.every and step % c.eval.every == 0 and step != total:
            log_preference_eval(run, step)
        if c.checkpoint.every and step % c.checkpoint.every == 0 and step != total:
            _save(run, step)

    def tokens_in(batches: list[Batch]) -> int:
        return sum(int(b["chosen_len"].sum() + b["rejected_len"].sum()) for b in batches)

    if start_step == 0:
        log_preference_eval(run, 0)
    on_log = lambda step, result, seconds, tokens: _log_step(run, step, result, seconds, tokens)
    fit(run.trainer, start_step, total, LoopHooks(next_batches, on_log, on_step_end, tokens_in, c.log.every))
    metrics = log_preference_eval(run, total)
    path = _save(run, total)
    key = "accuracy" if c.align.method == "reward" else "reward_accuracy"
    summary = (f"held-out loss {metrics['loss']:.4f}, pair accuracy {metrics[key]:.3f}; "
               if metrics is not None else "")
    run.display.message(f"done: step {total}, {summary}checkpoint saved to {path}")


# ---- grpo -----------------------------------------------------------------------------------------------

def _grpo_setup(cfg: AlignConfig, tokenizer: TextTokenizer, seq_len: int, device: torch.device,
                reward_model: RewardModelLoader | None) -> dict[str, Any]:
    a = cfg.align
    if a.max_new_tokens >= seq_len:
        raise ConfigError(f"align.max_new_tokens ({a.max_new_tokens}) leaves no room for a prompt in "
                          f"data.seq_len={seq_len}")
    max_prompt = seq_len - a.max_new_tokens
    prompts, skipped = read_prompts(cfg.data.path, tokenizer, max_prompt)
    train, val = split(prompts, cfg.data.val_fraction, cfg.train.seed)
    reward = load_reward(a.reward, device, reward_model)
    step = GRPOStep(a.clip_eps, a.kl_coef, a.loss_type, a.check_logprobs, a.logprob_tolerance)
    describe = (f"{len(prompts)} prompts ({skipped} longer than {max_prompt} tokens skipped): {len(train)} train / "
                f"{len(val)} val; {a.group_size} completions per prompt; reward {reward.name}")
    # The loader walks prompt indices; rollouts are made from the records.
    return {"step": step, "train": {"index": torch.arange(len(train))}, "prompts": train, "val_prompts": val,
            "reward": reward, "describe": describe}


def _grpo_model_state(cfg: AlignConfig, model: nn.Module, tokenizer: TextTokenizer, device: torch.device,
                      seq_len: int, rank_prompts: int) -> dict[str, Any]:
    """The engine that generates with the policy itself (this rank's prompts), and the KL reference."""
    a = cfg.align
    rollouts = rank_prompts * a.group_size
    blocks_per_sequence = -(-seq_len // KV_BLOCK_SIZE)
    # CUDA graphs stay off: they would capture kernels for the weights' current dtype and addresses, and the
    # adapters' wrappers change between training and generation; eager decode keeps rollouts exact.
    engine = Engine(model, tokenizer, max_batch_size=min(rollouts, 256), block_size=KV_BLOCK_SIZE,
                    num_blocks=min(rollouts, 256) * blocks_per_sequence, device=device, decode_graphs=False)
    model.train()
    reference = None
    if a.kl_coef > 0 and cfg.finetune.method == "full":
        # Full training changes every weight: the reference must be a frozen copy (LoRA needs none).
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return {"engine": engine, "reference": reference}


def sample_and_score(run: AlignRun, step: int, records: list, group_size: int, temperature: float,
                     first_prompt: int = 0) -> tuple[list, torch.Tensor, RolloutStats]:
    """Generate `group_size` completions per record with the policy itself and score them; the statistics
    are over every rank's rollouts."""
    c, a = run.cfg, run.cfg.align
    start = time.perf_counter()
    run.model.eval()
    try:
        with run.trainer.autocast():
            results = generate_rollouts(run.extra["engine"], records, group_size, a.max_new_tokens, temperature,
                                        a.top_p, c.train.seed, step, first_prompt,
                                        (decode_escapes(a.stop, "align.stop"),) if a.stop else ())
    finally:
        run.model.train()
    seconds = time.perf_counter() - start
    prompts = [r.prompt for r in records for _ in range(group_size)]
    fields = [r.fields for r in records for _ in range(group_size)]
    sequences = [records[i // group_size].ids + res.token_ids for i, res in enumerate(results)]
    rewards = torch.tensor(run.extra["reward"](step, prompts, [r.text for r in results], fields, sequences),
                           dtype=torch.float32)
    sums = run.dp.sum(rollout_sums(rewards, results, group_size).to(run.device)).cpu()
    return results, rewards, rollout_stats(sums, seconds)


def make_rollout(run: AlignRun, step: int, records: list, first_prompt: int = 0) -> tuple[Batch, RolloutStats]:
    """Sample, score and turn into training rows (with reference log-probabilities when kl_coef > 0)."""
    c, a = run.cfg, run.cfg.align
    results, rewards, stats = sample_and_score(run, step, records, a.group_size, a.temperature, first_prompt)
    pad_id = run.tokenizer.pad_id if run.tokenizer.pad_id is not None else run.tokenizer.eos_id
    rows = rollout_rows(records, results, group_advantages(rewards, a.group_size, a.scale_rewards), a.group_size,
                        pad_id)
    micro = c.train.micro_batch_size * a.group_size or rows["seq_ids"].shape[0]
    if a.kl_coef > 0:
        reference = run.extra["reference"]
        rows["ref_logprobs"] = token_logprobs(reference if reference is not None else run.model, rows, micro,
                                              run.device, run.trainer.autocast, disable_adapters=reference is None)
    if a.updates_per_rollout > 1:
        rows["old_logprobs"] = token_logprobs(run.model, rows, micro, run.device, run.trainer.autocast)
    return rows, stats


def log_grpo_eval(run: AlignRun, step: int) -> float | None:
    """Mean reward of greedy completions for the held-out prompts."""
    e = run.cfg.eval
    records = run.extra["val_prompts"][:e.batches * e.batch_size]
    if not records:
        return None
    _, _, stats = sample_and_score(run, step, records, group_size=1, temperature=0.0)
    run.logger.log({"step": step, "val_reward": stats.reward_mean, "val_completion_len": stats.mean_completion_len})
    return stats.reward_mean


def grpo_loop(run: AlignRun, start_step: int) -> None:
    c, a = run.cfg, run.cfg.align
    total = run.plan.steps
    prompts = run.extra["prompts"]
    state: dict[str, Any] = {"step": start_step}

    def next_batches() -> list[Batch]:
        step = state["step"]  # 0-based index of the optimizer step about to run
        state["step"] += 1
        first_update = step % a.updates_per_rollout == 0
        if first_update:
            mine = run.dp.local_slice(run.loader.batch_size)  # this rank's prompts of the global batch
            indices = run.loader.next_batch()["index"][mine].tolist()
            state["rows"], state["stats"] = make_rollout(run, step, [prompts[i] for i in indices], mine.start)
            state["gen_seconds"] = state.get("gen_seconds", 0.0) + state["stats"].seconds
        rows = {k: v for k, v in state["rows"].items() if first_update or k != "gen_logprobs"}
        # train.micro_batch_size counts prompts, as global_batch_size does: each brings its whole group.
        return _split_rows(rows, c.train.micro_batch_size * a.group_size, run.device, row_batches)

    def on_log(step: int, result: StepResult, seconds: float, tokens: int) -> None:
        gen = state.pop("gen_seconds", 0.0)
        extra = {**state["stats"].to_log(), "generate_share": gen / max(seconds, 1e-9)}
        _log_step(run, step, result, seconds, tokens, extra)

    def on_step_end(step: int) -> None:
        if c.eval.every and step % c.eval.every == 0 and step != total:
            log_grpo_eval(run, step)
        if c.checkpoint.every and step % c.checkpoint.every == 0 and step != total:
            _save(run, step)

    def tokens_in(batches: list[Batch]) -> int:
        return sum(int(b["seq_len"].sum()) for b in batches)

    if start_step == 0:
        log_grpo_eval(run, 0)
    fit(run.trainer, start_step, total, LoopHooks(next_batches, on_log, on_step_end, tokens_in, c.log.every))
    val_reward = log_grpo_eval(run, total)
    path = _save(run, total)
    summary = f"held-out greedy reward {val_reward:.3f}; " if val_reward is not None else ""
    run.display.message(f"done: step {total}, {summary}checkpoint saved to {path}")


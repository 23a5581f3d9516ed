"""Alignment (`cybertron align`): preference optimisation (dpo, ipo, simpo, orpo), reward models and the
online methods (grpo, rloo, reinforce++, ppo) on the one Trainer and the one training driver (train/session.py).

The methods differ by step function, data and a small typed task only (ARCHITECTURE.md rule 6): the
optimizer, checkpoints (adapters alone under LoRA), resume and logging are those of `cybertron finetune`.
The online methods' task lives in align/grpo_task.py. The command (cybertron/commands/align.py) opens the
base (and a reward-model run) through runs.py and hands it here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cybertron.align.config import ONLINE_METHODS, AlignConfig
from cybertron.align.context_parallel import SequenceSums
from cybertron.align.dpo import PreferenceStep, evaluate_metrics, pair_batches, reference_logprobs
from cybertron.align.grpo_task import GRPOSetup, GRPOTask, grpo_model_state, grpo_setup
from cybertron.align.kto import KTOSetup, KTOTask, kto_reference, kto_setup
from cybertron.align.mix import preference_data
from cybertron.align.multiturn import MultiTurnGRPOTask
from cybertron.align.online_dpo import OnlineDPOSetup, OnlineDPOTask, online_dpo_model_state, online_dpo_setup
from cybertron.align.ppo import attach_value_head
from cybertron.align.reward import RewardModel, RewardStep
from cybertron.align.rewards import RewardModelLoader
from cybertron.align.task import AlignTask, split_rows
from cybertron.data.chat_template import remedy_on_failure, resolve_chat_format
from cybertron.data.mixture import Mixture
from cybertron.data.sft import row_loader
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import ConfigError
from cybertron.finetune.model import OpenBase, base_dtype, build_finetune_model
from cybertron.finetune.run import check_layout, resolve_seq_len, run_adapter_task
from cybertron.parallel.build_trainer import build_trainer
from cybertron.parallel.context_parallel import apply_context_parallel
from cybertron.parallel.runtime import DistEnv, layout_dims
from cybertron.parallel.world import World, run_on_world
from cybertron.train.epochs import plan_work
from cybertron.train.precision import autocast, resolve_dtype
from cybertron.train.schedule import lr_at
from cybertron.train.session import Finished, RecordRun, find_resume_checkpoint, resolve_run_dir
from cybertron.train.trainer import Batch, to_device


def run_align(cfg: AlignConfig, open_base: OpenBase, record_run: RecordRun, env: DistEnv | None = None,
              reward_model: RewardModelLoader | None = None) -> Finished:
    """One process, or one rank of a run started by torchrun with the [parallel] section's layout: align the
    base model.path names (`open_base` reads it; its weights are loaded on this rank's device); `record_run`
    writes the run's metadata; `reward_model` loads a reward-model run given as align.reward."""
    env = env or DistEnv()
    dims = layout_dims(cfg, env.world_size)
    return run_on_world(env, dims, cfg.train.device, cfg.parallel.timeout_s,
                        lambda world: _run_align(cfg, open_base, record_run, reward_model, world))


def _run_align(cfg: AlignConfig, open_base: OpenBase, record_run: RecordRun,
               reward_model: RewardModelLoader | None, world: World) -> Finished:
    """Build everything (data and reference log-probabilities first, so bad input fails before training),
    then hand the method's task to the training driver (which resumes if asked)."""
    run_dir = Path(world.from_main(str(resolve_run_dir(cfg))))
    resume_from = find_resume_checkpoint(run_dir, cfg.run.resume, report=world.is_main)
    device = world.device
    dtype_name = resolve_dtype(cfg.train.dtype, device)
    base = open_base(Path(cfg.model.path))
    model_cfg, tokenizer = base.config, base.tokenizer
    # Chat-message records render through it; the run dir keeps it for generate/serve/export either way.
    chat = resolve_chat_format(tokenizer.chat_template, cfg.data.chat_template)
    tokenizer.chat_template = chat.template
    seq_len = resolve_seq_len(cfg.data.seq_len, model_cfg)
    check_layout(world.dims, cfg.parallel, model_cfg, seq_len)
    if cfg.align.method == "ppo" and model_cfg.final_logit_softcap is not None:
        raise ConfigError("ppo reads logits and values through the model's output-head hook, which does not "
                          f"apply model.final_logit_softcap={model_cfg.final_logit_softcap} yet; use grpo, rloo "
                          "or reinforce++")
    method, t = cfg.align.method, cfg.train
    amp = lambda: autocast(dtype_name, device)
    setup: GRPOSetup | PreferenceSetup | KTOSetup
    with remedy_on_failure():
        if method in ONLINE_METHODS:  # prompts and the reward before the model
            setup = grpo_setup(cfg, tokenizer, seq_len, device, reward_model)
        elif method == "online_dpo":  # kto / online_dpo: align/kto.py, align/online_dpo.py
            setup = online_dpo_setup(cfg, tokenizer, seq_len, device, reward_model)
        elif method == "kto":
            setup = kto_setup(cfg, tokenizer, seq_len)
        else:
            setup = preference_setup(cfg, tokenizer, seq_len)
    n_rows = next(iter(setup.train.values())).shape[0]
    plan = plan_work(n_rows, t.global_batch_size, t.steps, t.epochs, t.warmup_steps,
                     unit=world.dp_size * (t.micro_batch_size or 1),
                     steps_per_batch=cfg.align.updates_per_rollout if method in ONLINE_METHODS else 1)
    wrap = ((lambda backbone: RewardModel(backbone, seed=t.seed)) if method == "reward"
            else attach_value_head if method == "ppo" else None)
    weights = base.load(device, base_dtype(cfg.model.dtype, dtype_name, cfg.finetune.method))
    model = build_finetune_model(weights, cfg.finetune, t.seed, wrap=wrap)
    # References come from the weights as loaded: before a resumed checkpoint overwrites them, and before
    # the layout is applied (every rank computes the same values, with no communication but, under context
    # parallelism, that of its cp group).
    if isinstance(setup, GRPOSetup):
        state = online_dpo_model_state if isinstance(setup, OnlineDPOSetup) else grpo_model_state
        engine, reference = state(cfg, model, tokenizer, world, seq_len, plan.batch_size // world.dp_size,
                                  torch.bfloat16 if dtype_name == "bf16" else None)
    elif isinstance(setup, KTOSetup):
        micro = t.micro_batch_size or t.global_batch_size
        setup.train = kto_reference(world, model, setup.train, micro, device, amp)
        if setup.val is not None:
            setup.val = kto_reference(world, model, setup.val, micro, device, amp)
    elif getattr(setup.step, "needs_reference", False):
        micro = t.micro_batch_size or t.global_batch_size
        share = _shared_reference if world.dims.cp == 1 else _context_parallel_reference
        setup.train = share(world, model, setup.train, micro, device, amp)
        if setup.val is not None:
            setup.val = share(world, model, setup.val, micro, device, amp)
    schedule = lambda step: lr_at(step, t.lr, plan.warmup_steps, plan.steps, t.min_lr_ratio)
    trainer, parts = build_trainer(model, world, cfg.parallel, t, dtype_name, schedule, step_fn=setup.step,
                                   replicas_equal=True)
    loader = row_loader(setup.train, plan.batch_size, t.seed, setup.mixture)
    common = (cfg, run_dir, device, tokenizer, model, trainer, loader, world, plan, chat, setup.description)
    task: AlignTask
    if isinstance(setup, OnlineDPOSetup):
        task = OnlineDPOTask(*common, setup, engine, reference)
    elif isinstance(setup, GRPOSetup):
        grpo_task = MultiTurnGRPOTask if cfg.align.environment else GRPOTask  # multi-turn: align/multiturn.py
        task = grpo_task(*common, setup, engine, reference)
    else:
        task = KTOTask(*common, setup) if isinstance(setup, KTOSetup) else PreferenceTask(*common, setup)

    return run_adapter_task(cfg, task, run_dir, resume_from, trainer, model, parts, model_cfg, plan.steps,
                            base.path, chat.template, record_run, world)


def _shared_reference(world: World, model: nn.Module, rows: Batch, micro: int, device: torch.device,
                      amp: Callable) -> Batch:
    """Reference log-probabilities of every pair, each rank computing a share and all of them gathering the
    rest (the same values as one process: the model is not wrapped yet, so no rank waits on another)."""
    n = rows["chosen_ids"].shape[0]
    mine = world.row_share(n)
    if mine.start == mine.stop:  # more ranks than pairs: nothing to compute here, only to gather
        part = {"ref_chosen": torch.zeros(0), "ref_rejected": torch.zeros(0)}
    else:
        part = reference_logprobs(model, {k: v[mine] for k, v in rows.items()}, micro, device, amp)
    return {**rows, "ref_chosen": world.gather_rows(part["ref_chosen"], n),
            "ref_rejected": world.gather_rows(part["ref_rejected"], n)}


def _context_parallel_reference(world: World, model: nn.Module, rows: Batch, micro: int, device: torch.device,
                                amp: Callable) -> Batch:
    """Reference log-probabilities under context parallelism: the ranks of each cp group hold 1/cp of every
    sequence of their share of the pairs (the long sequences a rank could not hold whole), through the
    plain model with a context-parallel attention for this pass (parallelize() installs its own later)."""
    d = world.dims
    # rank = (dp_rank x cp + cp_rank) x tp + tp_rank (pp = 1): a cp group is one (dp_rank, tp_rank)
    groups, group = world.size // d.cp, world.dp_rank * d.tp + world.rank % d.tp
    n = rows["chosen_ids"].shape[0]
    per_group = -(-n // groups)
    mine = slice(min(group * per_group, n), min((group + 1) * per_group, n))
    part = torch.zeros(2, per_group)
    if mine.start < mine.stop:  # every rank of a cp group has the same rows: their collectives pair up
        logprobs = SequenceSums(apply_context_parallel(model, world.mesh["cp"].get_group())).response_logprobs
        ref = reference_logprobs(model, {k: v[mine] for k, v in rows.items()}, micro, device, amp,
                                 2 * d.cp, logprobs)
        part[0, :mine.stop - mine.start], part[1, :mine.stop - mine.start] = ref["ref_chosen"], ref["ref_rejected"]
    parts = [torch.empty_like(part, device=device) for _ in range(world.size)]
    dist.all_gather(parts, part.to(device))
    # One copy per cp group (its cp rank 0), in group order.
    owners = [r for r in range(world.size) if (r // d.tp) % d.cp == 0]
    both = torch.cat([parts[r] for r in owners], dim=1)[:, :n].cpu()
    return {**rows, "ref_chosen": both[0], "ref_rejected": both[1]}


# ---- preference pairs: dpo, ipo, simpo, orpo, reward -------------------------------------------------------

@dataclass
class PreferenceSetup:
    """What a preference method has before the model exists: its step function and its pairs."""

    step: PreferenceStep | RewardStep
    train: Batch  # padded pair rows (+ reference log-probabilities once computed)
    val: Batch | None
    description: str
    mixture: Mixture | None = None  # data.mix: train holds each source's pairs in turn


def preference_setup(cfg: AlignConfig, tokenizer: TextTokenizer, seq_len: int) -> PreferenceSetup:
    a = cfg.align
    data, mixture = preference_data(cfg.data, tokenizer, seq_len, cfg.train.seed)
    step = RewardStep() if a.method == "reward" else PreferenceStep(
        a.method, a.beta, a.label_smoothing, a.simpo_beta, a.simpo_gamma, a.orpo_lambda)
    n_val = data.val["chosen_ids"].shape[0] if data.val is not None else 0
    description = (f"{data.n_pairs} preference pairs ({data.n_truncated} cut to seq_len {seq_len}): "
                   f"{data.n_pairs - n_val} train / {n_val} val" + (f"; {mixture.describe()}" if mixture else ""))
    return PreferenceSetup(step, data.train, data.val, description, mixture)


@dataclass
class PreferenceTask(AlignTask):
    """dpo, ipo, simpo, orpo and reward modelling on preference pairs (session.Task)."""

    setup: PreferenceSetup

    def describe(self) -> str:
        return self.describe_with(self.plan.describe("pairs"))

    def next_micro_batches(self, step: int) -> list[Batch]:
        rows = self.loader.next_batch()  # the global batch (the same on every rank); this rank's share:
        mine = self.world.local_slice(self.loader.batch_size)
        return split_rows({k: v[mine] for k, v in rows.items()}, self.cfg.train.micro_batch_size, self.device,
                          partial(pair_batches, multiple=self.seq_multiple))

    @property
    def seq_multiple(self) -> int:
        """What every batch's sequence length is a multiple of: sequence parallelism gives each tensor-parallel
        rank an equal slice of it (the padding scores nothing, so the loss is that of one process); so does
        context parallelism."""
        d = self.world.dims
        sp = d.tp if d.tp > 1 and self.cfg.parallel.sequence_parallel else 1
        # Context parallelism cuts each sequence into 2 x cp chunks, each cp rank's share split over tp.
        return sp if d.cp == 1 else math.lcm(2 * d.cp, d.cp * sp)

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(b["chosen_len"].sum() + b["rejected_len"].sum()) for b in micro_batches)

    def evaluate(self, step: int) -> dict[str, float] | None:
        if self.setup.val is None:
            return None
        e = self.cfg.eval
        batches = pair_batches(self.setup.val, e.batch_size, self.seq_multiple)[:e.batches]
        batches = [to_device(b, self.device) for b in batches]
        metrics = evaluate_metrics(self.trainer, batches)
        return {f"val_{k}": v for k, v in metrics.items()}

    def summary(self, evaluation: dict[str, float] | None) -> str:
        if evaluation is None:
            return ""
        key = "val_accuracy" if self.cfg.align.method == "reward" else "val_reward_accuracy"
        return f"held-out loss {evaluation['val_loss']:.4f}, pair accuracy {evaluation[key]:.3f}; "


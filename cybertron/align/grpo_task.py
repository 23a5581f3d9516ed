"""The online methods (grpo, rloo, reinforce++, ppo) on the one training driver: prompts and the reward
(GRPOSetup), the engine that samples with the policy itself, and the task (session.Task) that turns each
step's prompts into scored rollouts with the method's advantages (align/advantages.py)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from cybertron.align.advantages import (
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    shaped_rewards,
    whiten,
)
from cybertron.align.config import AlignConfig
from cybertron.align.environments import EnvironmentReward
from cybertron.align.grpo import (
    GRPOStep,
    RolloutStats,
    generate_rollouts,
    rollout_checksum,
    rollout_rows,
    rollout_stats,
    rollout_sums,
    row_batches,
    token_logprobs,
)
from cybertron.align.mix import prompt_data
from cybertron.align.ppo import PPOStep, rollout_logprobs_and_values
from cybertron.align.preference_data import PromptRecord
from cybertron.align.rewards import RewardModelLoader, RewardSource, load_reward
from cybertron.align.task import AlignTask, split_rows
from cybertron.data.escapes import decode_escapes
from cybertron.data.mixture import Mixture
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import ConfigError
from cybertron.parallel.apply import shard_frozen, shards_parameters
from cybertron.parallel.dims import dp_mesh
from cybertron.parallel.lockstep import ShardedLockstep
from cybertron.parallel.world import World
from cybertron.serve.engine import Engine
from cybertron.train.trainer import Batch

KV_BLOCK_SIZE = 16
KL_LOSS_METHODS = ("grpo", "rloo")  # the KL to the reference is a loss term; reinforce++ and ppo shape rewards


@dataclass
class GRPOSetup:
    """What GRPO has before the model exists: its step function, prompts and reward."""

    step: GRPOStep  # PPOStep for ppo
    prompts: list[PromptRecord]
    val_prompts: list[PromptRecord]
    reward: RewardSource
    description: str
    mixture: Mixture | None = None  # data.mix: prompts holds each source's train prompts in turn

    @property
    def train(self) -> Batch:
        """The loader walks prompt indices; rollouts are made from the records."""
        return {"index": torch.arange(len(self.prompts))}


def grpo_setup(cfg: AlignConfig, tokenizer: TextTokenizer, seq_len: int, device: torch.device,
               reward_model: RewardModelLoader | None) -> GRPOSetup:
    a = cfg.align
    if a.max_new_tokens >= seq_len:
        raise ConfigError(f"align.max_new_tokens ({a.max_new_tokens}) leaves no room for a prompt in "
                          f"data.seq_len={seq_len}")
    max_prompt = seq_len - a.max_new_tokens
    train, val, n_read, skipped, mixture = prompt_data(cfg.data, tokenizer, max_prompt, cfg.train.seed)
    # multi-turn environments (align/multiturn.py): the episodes score themselves
    reward = EnvironmentReward(a.environment) if a.environment else load_reward(a.reward, device, reward_model)
    step = (PPOStep(a.clip_eps, a.value_clip, a.vf_coef, a.loss_type, a.check_logprobs, a.logprob_tolerance)
            if a.method == "ppo" else GRPOStep(a.clip_eps, a.kl_coef if a.method in KL_LOSS_METHODS else 0.0,
                                                 a.loss_type, a.check_logprobs, a.logprob_tolerance))
    description = (f"{n_read} prompts ({skipped} longer than {max_prompt} tokens skipped): {len(train)} "
                   f"train / {len(val)} val{'; ' + mixture.describe() if mixture else ''}; {a.group_size} "
                   f"completions per prompt; reward {reward.name}")
    return GRPOSetup(step, train, val, reward, description, mixture)


def grpo_model_state(cfg: AlignConfig, model: nn.Module, tokenizer: TextTokenizer, world: World, seq_len: int,
                     rank_prompts: int, param_dtype: torch.dtype | None = None) -> tuple[Engine, nn.Module | None]:
    """The engine that generates with the policy itself (this rank's prompts), and the KL reference. Called
    before the layout is applied: the engine keeps the module, which FSDP2 shards in place; under such a
    layout the engines of all ranks run in lockstep and the reference is sharded too."""
    a = cfg.align
    rollouts = rank_prompts * a.group_size
    blocks_per_sequence = -(-seq_len // KV_BLOCK_SIZE)
    sharded = world.is_distributed and shards_parameters(world.dims, cfg.parallel)
    lockstep = ShardedLockstep(model, dp_mesh(world.mesh).get_group(), world.device) if sharded else None
    # CUDA graphs stay off: they would capture kernels for the weights' current dtype and addresses, and the
    # adapters' wrappers change between training and generation; eager decode keeps rollouts exact.
    engine = Engine(model, tokenizer, max_batch_size=min(rollouts, 256), block_size=KV_BLOCK_SIZE,
                    num_blocks=min(rollouts, 256) * blocks_per_sequence, device=world.device,
                    decode_graphs=False, lockstep=lockstep,
                    kv_heads=model.config.n_kv_heads // world.dims.tp)
    model.train()
    reference = None
    if a.kl_coef > 0 and cfg.finetune.method == "full":
        # Full training changes every weight: the reference must be a frozen copy (LoRA needs none).
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        reference = shard_frozen(reference, world.dims, world.mesh, cfg.parallel, param_dtype)
    return engine, reference


@dataclass
class GRPOTask(AlignTask):
    """The online methods: each rollout's rows serve align.updates_per_rollout steps (PPO's epochs, each
    over the whole rollout as one mini-batch, split into micro-batches for accumulation)."""

    setup: GRPOSetup
    engine: Engine
    reference: nn.Module | None  # a frozen copy under full training with kl_coef > 0; LoRA disables adapters
    rows: Batch = field(default_factory=dict)  # the current rollout's training rows
    stats: RolloutStats | None = None  # the current rollout's statistics
    gen_seconds: float = 0.0  # generation time since the last log line

    def describe(self) -> str:
        return self.describe_with(self.plan.describe("prompts", "rollout"))

    def next_micro_batches(self, step: int) -> list[Batch]:
        a = self.cfg.align
        first_update = step % a.updates_per_rollout == 0
        if first_update:
            mine = self.world.local_slice(self.loader.batch_size)  # this rank's prompts of the global batch
            indices = self.loader.next_batch()["index"][mine].tolist()
            self.rows, self.stats = self.make_rollout(step, [self.setup.prompts[i] for i in indices], mine.start)
            self.gen_seconds += self.stats.seconds
        rows = {k: v for k, v in self.rows.items() if first_update or k != "gen_logprobs"}
        # train.micro_batch_size counts prompts, as global_batch_size does: each brings its whole group.
        return split_rows(rows, self.cfg.train.micro_batch_size * a.group_size, self.device, row_batches)

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(b["seq_len"].sum()) for b in micro_batches)

    def extra_log_fields(self, seconds: float) -> dict[str, float]:
        assert self.stats is not None  # a step ran, so a rollout was made
        gen, self.gen_seconds = self.gen_seconds, 0.0
        fields = {**self.stats.to_log(), "generate_share": gen / max(seconds, 1e-9)}
        if self.engine.lockstep is not None:  # the ranks' idle calls in this rollout: the price of uneven work
            fields["idle_forwards"] = self.stats.idle_forwards
        return fields

    def evaluate(self, step: int) -> dict[str, float] | None:
        """Mean reward of greedy completions for the held-out prompts."""
        e = self.cfg.eval
        records = self.setup.val_prompts[:e.batches * e.batch_size]
        if not records:
            return None
        _, _, stats = self.sample_and_score(step, records, group_size=1, temperature=0.0)
        return {"val_reward": stats.reward_mean, "val_completion_len": stats.mean_completion_len}

    def summary(self, evaluation: dict[str, float] | None) -> str:
        return f"held-out greedy reward {evaluation['val_reward']:.3f}; " if evaluation is not None else ""

    def sample_and_score(self, step: int, records: list[PromptRecord], group_size: int, temperature: float,
                         first_prompt: int = 0) -> tuple[list, torch.Tensor, RolloutStats]:
        """Generate `group_size` completions per record with the policy itself and score them; the statistics
        are over every rank's rollouts."""
        c, a = self.cfg, self.cfg.align
        start = time.perf_counter()
        idle_before = self._idle_forwards()
        self.model.eval()
        try:
            with self.trainer.autocast():
                results = generate_rollouts(self.engine, records, group_size, a.max_new_tokens, temperature,
                                            a.top_p, c.train.seed, step, first_prompt,
                                            (decode_escapes(a.stop, "align.stop"),) if a.stop else ())
        finally:
            self.model.train()
        seconds = time.perf_counter() - start
        # Tensor-parallel ranks sample from the same replicated logits with the same seeds; were they ever to
        # differ, each would train on other rows and the layers' sums would mix them: fail instead.
        if not self.world.same_over_tp(rollout_checksum(results)):
            raise RuntimeError(f"step {step}: the tensor-parallel ranks of a replica sampled different rollouts")
        prompts = [r.prompt for r in records for _ in range(group_size)]
        fields = [r.fields for r in records for _ in range(group_size)]
        sequences = [records[i // group_size].ids + res.token_ids for i, res in enumerate(results)]
        rewards = torch.tensor(self.setup.reward(step, prompts, [r.text for r in results], fields, sequences),
                               dtype=torch.float32)
        idle = self._idle_forwards() - idle_before
        sums = self.world.sum_over_dp(rollout_sums(rewards, results, group_size, idle).to(self.device)).cpu()
        return results, rewards, rollout_stats(sums, seconds)

    def _idle_forwards(self) -> int:
        lockstep = self.engine.lockstep
        return lockstep.idle_forwards if isinstance(lockstep, ShardedLockstep) else 0

    def make_rollout(self, step: int, records: list[PromptRecord], first_prompt: int = 0
                     ) -> tuple[Batch, RolloutStats]:
        """Sample, score and turn into training rows with the method's advantages: grpo and rloo one per
        completion (and reference log-probabilities for the loss's KL term when kl_coef > 0); reinforce++ and
        ppo one per token, from rewards shaped with the KL to the reference (ppo adds the rollout's values and
        the value targets)."""
        c, a = self.cfg, self.cfg.align
        results, rewards, stats = self.sample_and_score(step, records, a.group_size, a.temperature, first_prompt)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        rows = rollout_rows(records, results, torch.zeros(len(results)), a.group_size, pad_id)
        micro = c.train.micro_batch_size * a.group_size or rows["seq_ids"].shape[0]
        ref = None
        if a.kl_coef > 0:
            reference = self.reference
            ref = token_logprobs(reference if reference is not None else self.model, rows, micro, self.device,
                                 self.trainer.autocast, disable_adapters=reference is None)
        old = values = None
        if a.method == "ppo":
            old, values = rollout_logprobs_and_values(self.model, rows, micro, self.device, self.trainer.autocast)
        elif a.updates_per_rollout > 1 or (a.method == "reinforce++" and ref is not None):
            old = token_logprobs(self.model, rows, micro, self.device, self.trainer.autocast)
        mask = rows["seq_mask"]
        if a.method == "grpo":
            rows["advantages"] = group_advantages(rewards, a.group_size, a.scale_rewards)
        elif a.method == "rloo":
            rows["advantages"] = rloo_advantages(rewards, a.group_size)
        elif a.method == "reinforce++":
            rows["advantages"] = reinforce_pp_advantages(rewards, mask, old, ref, a.kl_coef, a.gamma,
                                                         self._sum_over_dp)
        else:
            assert old is not None and values is not None
            advantages, returns = gae(shaped_rewards(rewards, mask, old, ref, a.kl_coef), values, mask, a.gamma,
                                      a.gae_lambda)
            rows.update(advantages=whiten(advantages, mask, self._sum_over_dp), returns=returns, old_values=values)
        if ref is not None:  # a loss term for grpo and rloo; logged only where it is shaped into the rewards
            rows["ref_logprobs"] = ref
        if old is not None and a.updates_per_rollout > 1:
            rows["old_logprobs"] = old
        return rows, stats

    def _sum_over_dp(self, sums: torch.Tensor) -> torch.Tensor:
        return self.world.sum_over_dp(sums.to(self.device)).cpu()

"""GRPO (Shao et al. 2024, DeepSeekMath) with generation in the loop by cybertron's own engine.

Each rollout samples `group_size` completions for every prompt with `serve.engine.Engine` running the very
model being trained (same module, same parameters: nothing is copied or synchronised), scores them, and
turns rewards into group-relative advantages A = (r - mean_group) / std_group. The step function then
minimises the clipped policy-gradient loss with a k3 KL penalty to the reference (the base with adapters
disabled under LoRA; a frozen copy only for full training with kl_coef > 0).

Generator and trainer run the same code on the same weights, so the token log-probabilities the engine
reports equal the trainer's (fp32); `check_logprobs` asserts it at every step. Under ZeRO-3 the engine runs
the sharded policy itself: each block gathers its weights in its forward, and the ranks' engines call the
model in lockstep (parallel/lockstep.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cybertron.align.advantages import group_advantages  # noqa: F401  (its home before advantages.py)
from cybertron.align.preference_data import PromptRecord, TokenizedSequence, pad_sequences, trim_batch
from cybertron.finetune.lora import adapters_disabled
from cybertron.serve.engine import Engine, Result
from cybertron.serve.sampling import SamplingParams
from cybertron.train.losses import next_token_logprobs
from cybertron.train.trainer import Batch, to_device


class LogprobMismatch(RuntimeError):
    """The generator's log-probabilities differ from the trainer's beyond the tolerance (check_logprobs)."""


def request_seed(seed: int, step: int, index: int) -> int:
    """A sampling seed per (run seed, rollout step, request): rollouts repeat exactly on resume."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def generate_rollouts(engine: Engine, prompts: list[PromptRecord], group_size: int, max_new_tokens: int,
                      temperature: float, top_p: float, seed: int, step: int, first_prompt: int = 0,
                      stop: tuple[str, ...] = ()) -> list[Result]:
    """group_size sampled completions per prompt (prompt-major order), run as one continuous batch.
    `first_prompt` is the global position of prompts[0] in the step's batch: a data-parallel rank samples
    exactly what one process would for the same prompts."""
    requests, params = [], []
    for p, record in enumerate(prompts, start=first_prompt):
        for g in range(group_size):
            requests.append(record.ids)
            params.append(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                         seed=request_seed(seed, step, p * group_size + g), logprobs=True,
                                         stop=stop))
    # The policy's weights changed since the last rollout: KV cached then is stale. Within this call the
    # group's copies of a prompt share its cached blocks (prefilled once).
    engine.reset_prefix_cache()
    return engine.generate(requests, params)


def rollout_rows(prompts: list[PromptRecord], results: list[Result], advantages: torch.Tensor, group_size: int,
                 pad_id: int) -> Batch:
    """Right-padded rows of prompt + completion: seq_ids/seq_mask/seq_len, the generator's log-probability of
    each completion token aligned with its position (`gen_logprobs`, (N, L), 0 elsewhere) and advantages."""
    seqs = []
    for i, result in enumerate(results):
        prompt, completion = prompts[i // group_size].ids, result.token_ids
        # multi-turn episodes (align/multiturn.py) carry their own prompt and mask only generated tokens
        prompt = getattr(result, "prompt_ids", None) or prompt
        mask = getattr(result, "generated", None) or [True] * len(completion)
        seqs.append(TokenizedSequence(prompt + completion, [False] * len(prompt) + mask))
    rows = pad_sequences(seqs, pad_id, "seq")
    gen = torch.zeros(rows["seq_ids"].shape, dtype=torch.float32)
    for i, result in enumerate(results):
        start = len(seqs[i]) - len(result.token_ids)
        gen[i, start:start + len(result.logprobs)] = torch.tensor(result.logprobs, dtype=torch.float32)
    return {**rows, "gen_logprobs": gen, "advantages": advantages.float()}


def row_batches(rows: Batch, batch_size: int) -> list[Batch]:
    n = rows["seq_ids"].shape[0]
    return [trim_batch({k: v[i:i + batch_size] for k, v in rows.items()}) for i in range(0, n, batch_size)]


@torch.no_grad()
def token_logprobs(model: nn.Module, rows: Batch, batch_size: int, device: torch.device,
                   autocast: Callable[[], contextlib.AbstractContextManager],
                   disable_adapters: bool = False) -> torch.Tensor:
    """(N, L) fp32 log p(token at t | tokens before) under `model` in eval mode (column 0 is 0), with the
    LoRA adapters disabled when asked (the reference of a LoRA policy)."""
    width = rows["seq_ids"].shape[1]
    was_training = model.training
    model.eval()
    out = []
    with adapters_disabled(model) if disable_adapters else contextlib.nullcontext():
        for batch in row_batches(rows, batch_size):
            ids = to_device(batch, device)["seq_ids"]
            with autocast():
                logp = next_token_logprobs(model(ids), ids).cpu()
            out.append(torch.nn.functional.pad(logp, (1, width - 1 - logp.shape[1])))
    model.train(was_training)
    return torch.cat(out)


class GRPOStep:
    """Clipped policy gradient + k3 KL to the reference, summed over completion tokens ("token") or over
    completions of per-completion means ("sequence"); the Trainer divides by the global unit count.

    Batch: seq_ids, seq_mask, advantages, and optionally old_logprobs (the policy before this rollout's
    first update, when several updates reuse it), ref_logprobs (kl_coef > 0) and gen_logprobs (compared with
    the trainer's log-probabilities: logged as `logprob_gap`, asserted under `check`)."""

    def __init__(self, clip_eps: float = 0.2, kl_coef: float = 0.04, loss_type: str = "token", check: bool = False,
                 tolerance: float = 1e-5):
        self.clip_eps, self.kl_coef, self.loss_type = clip_eps, kl_coef, loss_type
        self.check, self.tolerance = check, tolerance

    def weight(self, batch: Batch) -> torch.Tensor:
        if self.loss_type == "token":
            return batch["seq_mask"][:, 1:].sum()
        return torch.tensor(batch["seq_ids"].shape[0], device=batch["seq_ids"].device)

    def _reduce(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "token":
            return (per_token * mask).sum()
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["seq_ids"]
        mask = batch["seq_mask"][:, 1:].float()
        per_token, metrics = self.policy_loss(next_token_logprobs(model(ids), ids), batch, mask)
        return self._reduce(per_token, mask), metrics

    def policy_loss(self, logp: torch.Tensor, batch: Batch, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token clipped policy-gradient loss (+ kl_coef x k3 KL when the batch has ref_logprobs) of the trainer's
        log-probabilities `logp` (B, T-1). Advantages are one per completion (B,) or one per token (B, T),
        aligned with the sequence as gen_logprobs is (token-level estimators)."""
        metrics: dict[str, torch.Tensor] = {}
        if "gen_logprobs" in batch:
            gap = (logp.detach() - batch["gen_logprobs"][:, 1:]).abs() * mask
            if self.check:
                self._assert_close(gap, batch)
            metrics["logprob_gap"] = self._reduce(gap, mask)
        old = batch["old_logprobs"][:, 1:] if "old_logprobs" in batch else logp.detach()
        ratio = torch.exp(logp - old)
        advantages = batch["advantages"]
        advantages = advantages[:, 1:] if advantages.dim() == 2 else advantages[:, None]
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        metrics["clip_fraction"] = self._reduce(((ratio - clipped).abs() > 0).float(), mask)
        if "ref_logprobs" in batch:
            delta = batch["ref_logprobs"][:, 1:] - logp
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0 (Schulman 2020)
            if self.kl_coef > 0:  # 0: logged only (reinforce++ and ppo shape the KL into the rewards instead)
                per_token = per_token + self.kl_coef * kl
            metrics["kl"] = self._reduce(kl.detach(), mask)
        return per_token, metrics

    def _assert_close(self, gap: torch.Tensor, batch: Batch) -> None:
        worst = float(gap.max())
        if worst > self.tolerance:
            row, col = divmod(int(gap.argmax()), gap.shape[1])
            raise LogprobMismatch(f"generator and trainer log-probabilities differ by {worst:.3g} (tolerance "
                                  f"{self.tolerance:g}) at completion row {row}, token {col + 1} (id "
                                  f"{int(batch['seq_ids'][row, col + 1])})")


@dataclass
class RolloutStats:
    reward_mean: float
    reward_std: float
    completion_tokens: int
    mean_completion_len: float
    truncated_fraction: float
    zero_advantage_groups: float  # share of groups whose completions all scored the same (no signal)
    seconds: float
    idle_forwards: int = 0  # under ZeRO-3: model calls ranks made only to join the others' weight gathers

    def to_log(self) -> dict[str, float]:
        return {"reward": self.reward_mean, "reward_std": self.reward_std,
                "completion_len": self.mean_completion_len, "truncated": self.truncated_fraction,
                "zero_adv_groups": self.zero_advantage_groups,
                "rollout_tokens_per_s": self.completion_tokens / max(self.seconds, 1e-9)}


def rollout_sums(rewards: torch.Tensor, results: list[Result], group_size: int,
                 idle_forwards: int = 0) -> torch.Tensor:
    """Sums that add up over ranks: reward, reward^2, completions, completion tokens, truncated completions,
    groups whose rewards are all equal, groups, idle model calls (lockstep generation)."""
    groups = rewards.view(-1, group_size)
    flat = (groups.max(dim=1).values == groups.min(dim=1).values).float().sum()
    return torch.tensor([float(rewards.sum()), float((rewards.double() ** 2).sum()), len(results),
                         sum(len(r.token_ids) for r in results), sum(r.finish_reason == "length" for r in results),
                         float(flat), groups.shape[0], idle_forwards], dtype=torch.float64)


def rollout_checksum(results: list[Result]) -> int:
    """A number that differs, almost surely, between two different lists of completions (token ids in
    order); it fits in an int64 so ranks can compare it with one all-reduce."""
    total = 0
    for r in results:
        for t in [*r.token_ids, -1]:  # -1 ends a completion: [1], [2] differs from [1, 2], []
            total = (total * 1_000_003 + t + 1) % (1 << 61)
    return total


def rollout_stats(sums: torch.Tensor, seconds: float) -> RolloutStats:
    total, squares, n, tokens, truncated, flat, groups, idle = sums.tolist()
    mean = total / n
    var = (squares - n * mean * mean) / (n - 1) if n > 1 else 0.0  # unbiased, as torch.std
    return RolloutStats(mean, max(var, 0.0) ** 0.5, int(tokens), tokens / n, truncated / n, flat / groups, seconds,
                        int(idle))

"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
OnlineDPOTrainer): each step samples two completions per prompt from the CURRENT policy with cybertron's own
engine (GRPO's rollout path: the same module, the generator's token log-probabilities equal the trainer's and
`align.check_logprobs` asserts it), judges them with the reward (a function or a reward-model run, as GRPO),
makes (chosen, rejected) of the higher- and lower-scored one, and takes a DPO (or IPO) step against the
reference (the base with adapters disabled under LoRA, a frozen copy under full training).

A tie (both completions scored the same) states no preference: the pair stays in the batch with weight 0, so
it adds nothing to the loss, the gradient or the pair count (every rank keeps the same number of rows, so
data-parallel ranks run the same micro-batches); `ties` logs their share. TRL breaks ties towards the first
sample instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cybertron.align import losses
from cybertron.align.config import AlignConfig
from cybertron.align.dpo import pair_batches, reference_logprobs
from cybertron.align.grpo import LogprobMismatch
from cybertron.align.grpo_task import GRPOSetup, GRPOTask, grpo_model_state, grpo_setup
from cybertron.align.preference_data import PromptRecord, TokenizedSequence, pad_sequences
from cybertron.align.rewards import RewardModelLoader
from cybertron.align.task import split_rows
from cybertron.data.tokenizer import TextTokenizer
from cybertron.parallel.world import World
from cybertron.serve.engine import Engine, Result
from cybertron.train.losses import next_token_logprobs
from cybertron.train.trainer import Batch

SAMPLES = 2  # completions per prompt: one pair


class OnlineDPOStep:
    """The DPO (or IPO) loss of each weighted pair, on per-token log-probabilities compared with the
    generator's (`logprob_gap`: the mean per token of |trainer - generator| / max(1, |log p|), asserted under
    `check` token by token)."""

    needs_reference = False  # the rollout brings ref_chosen / ref_rejected with every batch

    def __init__(self, loss: str = "dpo", beta: float = 0.1, check: bool = False, tolerance: float = 1e-5):
        self.loss, self.beta, self.check, self.tolerance = loss, beta, check, tolerance

    def weight(self, batch: Batch) -> torch.Tensor:
        return batch["pair_weight"].sum()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["chosen_ids"].shape[0]
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        scored = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])[:, 1:].float()
        logp = next_token_logprobs(model(ids), ids)
        gap = (logp.detach() - torch.cat([batch["chosen_gen"], batch["rejected_gen"]])[:, 1:]).abs() * scored
        # Relative beyond |log p| = 1: DPO pushes rejected tokens to low log-probabilities, whose fp32 rounding
        # grows with their magnitude (an absolute 1e-5 failed once at 2.5e-5 in a 60-step full-weight run).
        lp = logp.detach()
        relative = gap / lp.abs().clamp(min=1)
        if self.check and float(relative.max()) > self.tolerance:
            row, col = divmod(int(relative.argmax()), gap.shape[1])
            raise LogprobMismatch(f"generator and trainer log-probabilities differ by {float(gap[row, col]):.3g} "
                                  f"at log p {float(lp[row, col]):.3g} (tolerance {self.tolerance:g} x max(1, "
                                  f"|log p|)) at completion row {row}, token {col + 1} (id {int(ids[row, col + 1])})")
        sums, tokens = (logp * scored).sum(-1), scored.sum(-1).clamp(min=1)
        pc, pr, nc, nr = sums[:n], sums[n:], tokens[:n], tokens[n:]
        if self.loss == "dpo":
            per, rc, rr = losses.dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], self.beta)
        else:
            per, rc, rr = losses.ipo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], nc, nr, self.beta)
        w = batch["pair_weight"]
        mean_gap = relative.sum(-1) / tokens
        metrics = {"reward_margin": (w * (rc - rr)).sum(), "reward_accuracy": (w * (rc > rr).float()).sum(),
                   "logp_chosen": (w * pc.detach()).sum(), "logp_rejected": (w * pr.detach()).sum(),
                   "logprob_gap": (mean_gap[:n] + mean_gap[n:]).sum() / 2}
        return (w * per).sum(), metrics


def preference_rows(records: list[PromptRecord], results: list[Result], rewards: torch.Tensor,
                    pad_id: int) -> Batch:
    """One pair per prompt from its two samples (results in prompt-major order): the higher reward is chosen;
    `pair_weight` is 0 for a tie. chosen_gen/rejected_gen hold the generator's token log-probabilities aligned
    with their positions (0 elsewhere)."""
    sides: dict[str, list[tuple[list[int], Result]]] = {"chosen": [], "rejected": []}
    weights = []
    for i, record in enumerate(records):
        a, b = results[SAMPLES * i], results[SAMPLES * i + 1]
        ra, rb = float(rewards[SAMPLES * i]), float(rewards[SAMPLES * i + 1])
        first, second = (a, b) if ra >= rb else (b, a)
        sides["chosen"].append((record.ids, first))
        sides["rejected"].append((record.ids, second))
        weights.append(0.0 if ra == rb else 1.0)
    width = max(len(p) + len(r.token_ids) for side in sides.values() for p, r in side)
    rows: Batch = {"pair_weight": torch.tensor(weights)}
    for name, side in sides.items():
        seqs = [TokenizedSequence(p + r.token_ids, [False] * len(p) + [True] * len(r.token_ids)) for p, r in side]
        rows.update(pad_sequences(seqs, pad_id, name, width))
        gen = torch.zeros((len(side), width), dtype=torch.float32)
        for row, (p, r) in enumerate(side):
            gen[row, len(p):len(p) + len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        rows[f"{name}_gen"] = gen
    return rows


@dataclass
class OnlineDPOSetup(GRPOSetup):
    """GRPO's prompts and reward with the online DPO step."""

    step: OnlineDPOStep


def online_dpo_setup(cfg: AlignConfig, tokenizer: TextTokenizer, seq_len: int, device: torch.device,
                     reward_model: RewardModelLoader | None) -> OnlineDPOSetup:
    a = cfg.align
    base = grpo_setup(_as_grpo(cfg), tokenizer, seq_len, device, reward_model)
    step = OnlineDPOStep(a.online_loss, a.beta, a.check_logprobs, a.logprob_tolerance)
    description = base.description.replace(f"{SAMPLES} completions per prompt",
                                           f"{SAMPLES} completions per prompt judged into a pair ({a.online_loss})")
    return OnlineDPOSetup(step, base.prompts, base.val_prompts, base.reward, description, base.mixture)


def _as_grpo(cfg: AlignConfig) -> AlignConfig:
    """GRPO's settings for the shared rollout machinery: two samples per prompt and, under full training, a
    frozen reference (grpo_model_state keeps one when kl_coef > 0)."""
    return dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, group_size=SAMPLES, kl_coef=1.0))


def online_dpo_model_state(cfg: AlignConfig, model: nn.Module, tokenizer: TextTokenizer, world: World, seq_len: int,
                           rank_prompts: int, param_dtype: torch.dtype | None = None
                           ) -> tuple[Engine, nn.Module | None]:
    """The engine sampling from the policy itself and, under full training, the frozen reference (LoRA: None,
    the base with adapters disabled is the reference)."""
    return grpo_model_state(_as_grpo(cfg), model, tokenizer, world, seq_len, rank_prompts, param_dtype)


@dataclass
class OnlineDPOTask(GRPOTask):
    """Sample two completions per prompt, judge, and take one DPO step on the pairs (session.Task)."""

    def next_micro_batches(self, step: int) -> list[Batch]:
        mine = self.world.local_slice(self.loader.batch_size)  # this rank's prompts of the global batch
        indices = self.loader.next_batch()["index"][mine].tolist()
        self.rows, self.stats = self.make_rollout(step, [self.setup.prompts[i] for i in indices], mine.start)
        self.gen_seconds += self.stats.seconds
        # train.micro_batch_size counts prompts, as global_batch_size does: one pair each.
        return split_rows(self.rows, self.cfg.train.micro_batch_size, self.device, partial(pair_batches))

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(b["chosen_len"].sum() + b["rejected_len"].sum()) for b in micro_batches)

    def extra_log_fields(self, seconds: float) -> dict[str, float]:
        fields = super().extra_log_fields(seconds)
        fields["ties"] = fields.pop("zero_adv_groups")  # two samples scored the same: the pair is skipped
        return fields

    def make_rollout(self, step: int, records: list[PromptRecord], first_prompt: int = 0):
        """Sample and score two completions per prompt, pair them, and add the reference's log-probabilities."""
        c, a = self.cfg, self.cfg.align
        results, rewards, stats = self.sample_and_score(step, records, SAMPLES, a.temperature, first_prompt)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        rows = preference_rows(records, results, rewards, pad_id)
        micro = c.train.micro_batch_size or len(records)
        reference = self.reference if self.reference is not None else self.model
        rows = reference_logprobs(reference, rows, micro, self.device, self.trainer.autocast)
        return rows, stats


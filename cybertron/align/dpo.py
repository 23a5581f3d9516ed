"""Preference optimisation (DPO, IPO, SimPO, ORPO) as a step function for the one Trainer.

A batch holds pairs: `chosen_*` and `rejected_*` sequences (see preference_data.py) and, for the methods
that compare against a reference (DPO, IPO), the reference's summed response log-probabilities
`ref_chosen` / `ref_rejected`. Those are computed once, before training, by `reference_logprobs`: with the
adapters disabled under LoRA (the base *is* the reference, no second copy of the weights) and from the
initial weights under full training (again no copy: they are computed before the first update).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cybertron.align import losses
from cybertron.align.context_parallel import SequenceSums
from cybertron.align.preference_data import trim_batch
from cybertron.finetune.lora import adapters_disabled
from cybertron.parallel.context_parallel import ContextParallelAttention
from cybertron.parallel.tensor_parallel import sharded_next_token_logprobs
from cybertron.train.losses import next_token_logprobs
from cybertron.train.trainer import Batch, Trainer, to_device

REFERENCE_METHODS = ("dpo", "ipo")


def response_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's response tokens (B,), response token count (B,)) in fp32.
    Under tensor parallelism with loss parallelism the logits arrive sharded over the vocabulary (a DTensor):
    their log-probabilities are computed on the shards (the Trainer's step context is loss_parallel)."""
    logits = model(ids)
    if isinstance(logits, DTensor):
        logp = sharded_next_token_logprobs(logits, ids)
    else:
        logp = next_token_logprobs(logits, ids)
    scored = mask[:, 1:]
    return (logp * scored).sum(-1), scored.sum(-1).float()


# (model, ids, mask) -> (summed response log-probability (B,), response token count (B,)): response_logprobs,
# or its context-parallel form (align/context_parallel.py).
ResponseLogprobs = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def pair_logprobs(model: nn.Module, batch: Batch, logprobs: ResponseLogprobs = response_logprobs
                  ) -> tuple[torch.Tensor, ...]:
    """(chosen log-prob sums, rejected log-prob sums, chosen token counts, rejected token counts), each (B,).
    Chosen and rejected go through one forward: one pass over the weights."""
    n = batch["chosen_ids"].shape[0]
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    logp, tokens = logprobs(model, ids, mask)
    return logp[:n], logp[n:], tokens[:n], tokens[n:]


class PreferenceStep:
    """Sum over pairs of the method's loss; metrics are sums over pairs (the Trainer divides by the count)."""

    def __init__(self, method: str, beta: float = 0.1, label_smoothing: float = 0.0, simpo_beta: float = 2.0,
                 simpo_gamma: float = 0.5, orpo_lambda: float = 0.1, logprobs: ResponseLogprobs = response_logprobs):
        self.method = method
        self.beta, self.label_smoothing = beta, label_smoothing
        self.simpo_beta, self.simpo_gamma, self.orpo_lambda = simpo_beta, simpo_gamma, orpo_lambda
        self.logprobs = logprobs

    def under_context_parallel(self, attention: ContextParallelAttention) -> PreferenceStep:
        """This step on a context-parallel layout (Parallelized.wrap_step): whole-sequence log-probabilities
        summed over the cp ranks' chunks."""
        return PreferenceStep(self.method, self.beta, self.label_smoothing, self.simpo_beta, self.simpo_gamma,
                              self.orpo_lambda, SequenceSums(attention).response_logprobs)

    @property
    def needs_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    def weight(self, batch: Batch) -> torch.Tensor:
        ids = batch["chosen_ids"]
        return torch.tensor(ids.shape[0], device=ids.device)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pc, pr, nc, nr = pair_logprobs(model, batch, self.logprobs)
        if self.method == "dpo":
            per_pair, rc, rr = losses.dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], self.beta,
                                               self.label_smoothing)
        elif self.method == "ipo":
            per_pair, rc, rr = losses.ipo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], nc, nr, self.beta)
        elif self.method == "simpo":
            per_pair, rc, rr = losses.simpo_loss(pc, pr, nc, nr, self.simpo_beta, self.simpo_gamma)
        elif self.method == "orpo":
            per_pair, rc, rr = losses.orpo_loss(pc, pr, nc, nr, self.orpo_lambda)
        else:
            raise ValueError(f"unknown preference method {self.method!r}")
        metrics = {"reward_chosen": rc.sum(), "reward_rejected": rr.sum(), "reward_margin": (rc - rr).sum(),
                   "reward_accuracy": (rc > rr).float().sum(), "logp_chosen": pc.detach().sum(),
                   "logp_rejected": pr.detach().sum()}
        return per_pair.sum(), metrics


def pair_batches(rows: Batch, batch_size: int, multiple: int = 1) -> list[Batch]:
    """Consecutive batches of `rows` (in order), each cut to its own longest sequence rounded up to a
    multiple of `multiple` (the tensor-parallel degree under sequence parallelism, 2 x cp under context
    parallelism)."""
    n = rows["chosen_ids"].shape[0]
    return [trim_batch({k: v[i:i + batch_size] for k, v in rows.items()}, multiple)
            for i in range(0, n, batch_size)]


@torch.no_grad()
def reference_logprobs(model: nn.Module, rows: Batch, batch_size: int, device: torch.device,
                       autocast: Callable[[], contextlib.AbstractContextManager], multiple: int = 1,
                       logprobs: ResponseLogprobs = response_logprobs) -> Batch:
    """`rows` plus `ref_chosen` / `ref_rejected` (N,) fp32: the reference's summed response log-probabilities,
    i.e. the model as it is now with every LoRA adapter disabled, in eval mode. multiple, logprobs: as the
    batches of the run's layout (context parallelism cuts each sequence into 2 x cp chunks)."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with adapters_disabled(model):
        for batch in pair_batches(rows, batch_size, multiple):
            batch = to_device(batch, device)
            with autocast():
                pc, pr, _, _ = pair_logprobs(model, batch, logprobs)
            chosen.append(pc.cpu())
            rejected.append(pr.cpu())
    model.train(was_training)
    return {**rows, "ref_chosen": torch.cat(chosen), "ref_rejected": torch.cat(rejected)}


@torch.no_grad()
def evaluate_metrics(trainer: Trainer, batches: list[Batch]) -> dict[str, float]:
    """Mean loss and mean of every step metric per unit (pair, completion) over `batches`."""
    was_training = trainer.model.training
    trainer.model.eval()
    sums: dict[str, torch.Tensor] = {}
    units = torch.zeros(())
    for batch in batches:
        with trainer.comm.step_context(), trainer.autocast():
            loss, metrics = trainer.step_fn(trainer.model, batch)
        for key, value in {"loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0) + value.detach().float().cpu()
        units += trainer.step_fn.weight(batch).float().cpu()
    trainer.model.train(was_training)
    return {key: float(value / units.clamp(min=1)) for key, value in sums.items()}

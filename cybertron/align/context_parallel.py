"""Preference losses under context parallelism: each cp rank holds the zigzag chunks of every sequence
(parallel/context_parallel.py), but DPO, IPO, SimPO, ORPO and the Bradley-Terry reward need one number per
whole sequence (its summed response log-probability, its score at the last real token).

So the sequence is cut here rather than by ContextParallelStep: the targets are shifted *before* the cut
(zigzag chunks are not adjacent, so a rank's last local token does not hold the next one's input), each rank
sums its tokens' values per sequence, and `sum_over_ranks` adds those partial sums over the cp group.

Gradients: every cp rank then holds the same per-pair losses and the same pair count, so the Trainer's sums
over dp x cp count each pair cp times in the loss *and* in the units, which cancel. The backward of
`sum_over_ranks` is the sum of the ranks' incoming gradients (each rank's loss depends on every rank's
partial sum), i.e. cp x dloss/dsum on every rank; divided by the cp-fold unit count, that is exactly the
single process's gradient of this rank's tokens, which FSDP/DDP then add up over dp x cp."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from cybertron.errors import DataError
from cybertron.parallel.context_parallel import ContextParallelAttention, zigzag_indices


class _SumOverRanks(torch.autograd.Function):
    """All-reduce-sum over a group; backward: all-reduce-sum of the gradients (every rank's output depends on
    every rank's input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _SumOverRanks.apply(x, group)


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """(B, t) fp32 log p(labels) at every position of logits (B, t, V), the targets already aligned with
    them. Vocabulary-sharded DTensor logits (loss parallelism) go through torch's loss-parallel
    cross-entropy, as tensor_parallel.sharded_next_token_logprobs; chunked over rows either way."""
    parts = []
    for chunk, targets in zip(logits.split(chunk_rows), labels.split(chunk_rows)):
        nll = F.cross_entropy(chunk.float().flatten(0, 1), targets.reshape(-1), reduction="none")
        parts.append(-(nll.full_tensor() if isinstance(nll, DTensor) else nll).view(targets.shape))
    return torch.cat(parts)


class SequenceSums:
    """Whole-sequence quantities computed from this cp rank's chunks: the response log-probabilities of the
    preference methods and the reward model's last-token scores."""

    def __init__(self, attention: ContextParallelAttention):
        self.attention = attention

    def _cut(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's global token indices (t,) and their positions (B, t); sets the attention's batch."""
        b, t = ids.shape
        cp = self.attention.cp
        if t % (2 * cp):
            raise DataError(f"sequences of {t} tokens cannot be split into 2 x parallel.cp = {2 * cp} equal "
                            "chunks; pad the preference batches to a multiple of it")
        mine = zigzag_indices(t, cp, self.attention.rank, ids.device)
        self.attention.set_batch(t, None, ids.device)  # one causal sequence per row (right-padded)
        return mine, mine.expand(b, -1).contiguous()

    def response_logprobs(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """As dpo.response_logprobs: (summed log-probability of each row's response tokens (B,), response
        token count (B,)), fp32, the same on every cp rank."""
        labels = torch.zeros_like(ids)
        labels[:, :-1] = ids[:, 1:]  # token i's target, before the cut separates i from i + 1
        scored = torch.zeros_like(mask)
        scored[:, :-1] = mask[:, 1:]  # the last position predicts nothing
        mine, positions = self._cut(ids)
        logp = label_logprobs(model(ids[:, mine], positions=positions), labels[:, mine])
        partial = (logp * scored[:, mine]).sum(-1)
        return sum_over_ranks(partial, self.attention.group), scored.sum(-1).float()

    def last_token_scores(self, model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) a reward model's score of each right-padded row at its last real token: held by one cp rank,
        zero in the others' sums."""
        mine, positions = self._cut(ids)
        scores = model(ids[:, mine], positions=positions)  # (B, t)
        last = (mine[None, :] == (lengths - 1)[:, None]).to(scores.dtype)
        return sum_over_ranks((scores * last).sum(-1), self.attention.group)

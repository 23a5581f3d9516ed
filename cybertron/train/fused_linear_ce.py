"""The output head and the cross-entropy in one pass over chunks of tokens, never holding all the logits.

For a 128k vocabulary the logits dominate activation memory: 8,192 tokens x 128,256 x 2 bytes is 2.1 GB in
bf16, 4.2 GB more for the fp32 copy the loss reads, and the same again for their gradient. Here each chunk of
tokens computes its logits, its summed loss and, right away, the gradients of that loss with respect to the
chunk's hidden states and to the head weight; the logits are freed before the next chunk. What the backward
pass needs is then two tensors the size of the hidden states and of the weight (as Liger-Kernel's fused
linear cross-entropy does, here in plain PyTorch so it runs on CPU and under torch.compile alike).

The gradients are computed in the forward pass, so they assume the loss is used as is (the trainer scales it
by a constant and calls backward once): backward multiplies them by the incoming gradient, which is exact for
any scalar factor.

Under tensor parallelism the head is split over the vocabulary; `head_cross_entropy_sum` then runs the
vocabulary-parallel form (each rank its rows' logits, three small reductions per chunk) or, without loss
parallelism, gathers the head's weight first.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from cybertron.train.losses import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024  # x 128k vocab x 4 bytes = 0.5 GB of fp32 logits at a time


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _LinearCrossEntropySum(torch.autograd.Function):
    """With `group`, `weight` is this rank's rows [vocab_start, vocab_start + V_local) of a head sharded over
    the vocabulary across `group`, and `hidden` is the same on every rank (Megatron's vocabulary-parallel
    cross-entropy): the row maximum, the sum of exponentials and the target logit of each token are reduced
    over the group, so each rank only ever holds chunk x V_local logits; the hidden states' gradient, a
    partial sum over the vocabulary shards, is reduced once at the end."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                group: dist.ProcessGroup | None = None, vocab_start: int = 0) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        want_weight_grad = ctx.needs_input_grad[1]  # a frozen head (LoRA) skips half of the matmuls
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape if want_weight_grad else (0,), dtype=torch.float32,
                                  device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_local = weight.shape[0]
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(dtype)
            y = labels[start:start + chunk_tokens]
            logits = (h @ w.t()).float()  # (chunk, V_local): the only vocabulary-sized tensor, one chunk at a time
            valid = y != IGNORE_INDEX
            local = y - vocab_start
            mine = valid & (local >= 0) & (local < n_local)  # the target's logit lives on this rank
            target = local.clamp(0, n_local - 1)
            picked = torch.where(mine, logits.gather(1, target[:, None]).squeeze(1), 0.0)
            # log-sum-exp and softmax in place (logsumexp() would allocate a second chunk-sized tensor).
            top = logits.max(dim=-1).values
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            probs = logits.sub_(top[:, None]).exp_()
            sums = torch.stack([probs.sum(dim=-1), picked])
            if group is not None:
                dist.all_reduce(sums, group=group)  # one collective for the normaliser and the target logit
            norm, picked = sums[0], sums[1]
            total += torch.where(valid, top + norm.log() - picked, 0.0).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows.
            probs.div_(norm[:, None])
            probs[torch.arange(len(y), device=y.device), target] -= mine.to(probs.dtype)
            probs.mul_(valid[:, None])
            g = probs.to(dtype)
            grad_hidden[start:start + chunk_tokens] = (g @ w).to(hidden.dtype)
            if want_weight_grad and dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)  # in place: no weight-sized temporary
            elif want_weight_grad:
                # Per-chunk products in the compute dtype, summed in fp32: the precision of the unfused
                # path, whose weight gradient is one compute-dtype matmul accumulated into an fp32 .grad.
                grad_weight += (g.t() @ h).float()
        if group is not None:
            dist.all_reduce(grad_hidden, group=group)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: these tensors exist only to be returned here (backward runs once per forward).
        grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if not ctx.needs_input_grad[1]:
            return grad_hidden, None, None, None, None, None
        return grad_hidden, grad_weight.mul_(grad_output.to(grad_weight.dtype)), None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """sum over non-ignored positions of cross_entropy(hidden @ weight.T, labels), in fp32.

    hidden (..., D), weight (V, D) (the output head's), labels (...) with IGNORE_INDEX where there is no loss.
    Equal to `cross_entropy_sum(lm_head(hidden), labels)` up to rounding, with a fraction of the memory."""
    return _LinearCrossEntropySum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                        chunk_tokens)


def vocab_parallel_linear_cross_entropy_sum(hidden: torch.Tensor, weight_shard: torch.Tensor,
                                            labels: torch.Tensor, group: dist.ProcessGroup, vocab_start: int,
                                            chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """`linear_cross_entropy_sum` for an output head whose rows (the vocabulary) are split over `group`:
    weight_shard holds rows [vocab_start, vocab_start + len), hidden and labels are the same on every rank.
    Every rank returns the same (full) loss, and the gradient of `hidden` is the full one on every rank."""
    return _LinearCrossEntropySum.apply(hidden.reshape(-1, hidden.shape[-1]), weight_shard, labels.reshape(-1),
                                        chunk_tokens, group, vocab_start)


def head_cross_entropy_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                           vocab_parallel: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` against `labels`, chunk by chunk, for a plain head or one
    sharded over the vocabulary by tensor parallelism (its weight a DTensor with Shard(0)). Call it inside
    the model's forward (the `head` argument of Transformer.forward), where FSDP has gathered the weight.

    vocab_parallel: keep the head's vocabulary shards and reduce the loss's statistics over them (loss
    parallelism); otherwise a sharded head's weight is gathered and every rank computes the whole loss."""
    if isinstance(hidden, DTensor):  # sequence parallelism: the final norm's output is split over tokens
        hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
    weight = head.weight
    if not isinstance(weight, DTensor):
        return linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens)
    assert weight.device_mesh.ndim == 1 and weight.placements[0] == Shard(0), weight.placements
    if not vocab_parallel:
        return linear_cross_entropy_sum(hidden, weight.full_tensor(), labels, chunk_tokens)
    mesh = weight.device_mesh
    # Shard(0) splits rows as torch.chunk does: every rank but the last holds ceil(V / n) of them.
    rows_per_rank = math.ceil(weight.shape[0] / mesh.size())
    vocab_start = min(mesh.get_local_rank() * rows_per_rank, weight.shape[0])
    return vocab_parallel_linear_cross_entropy_sum(hidden, weight.to_local(), labels, mesh.get_group(),
                                                   vocab_start, chunk_tokens)

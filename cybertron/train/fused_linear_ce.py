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
"""

from __future__ import annotations

import torch

from cybertron.train.losses import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024  # x 128k vocab x 4 bytes = 0.5 GB of fp32 logits at a time


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        want_weight_grad = ctx.needs_input_grad[1]  # a frozen head (LoRA) skips half of the matmuls
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape if want_weight_grad else (0,), dtype=torch.float32,
                                  device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(dtype)
            y = labels[start:start + chunk_tokens]
            logits = (h @ w.t()).float()  # (chunk, V): the only vocabulary-sized tensor, one chunk at a time
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            # log-sum-exp and softmax in place (logsumexp() would allocate a second chunk-sized tensor).
            top = logits.max(dim=-1).values
            probs = logits.sub_(top[:, None]).exp_()
            norm = probs.sum(dim=-1)
            total += torch.where(valid, top + norm.log() - picked, 0.0).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows.
            probs.div_(norm[:, None])
            probs[torch.arange(len(y), device=y.device), target] -= 1.0
            probs.mul_(valid[:, None])
            g = probs.to(dtype)
            grad_hidden[start:start + chunk_tokens] = (g @ w).to(hidden.dtype)
            if want_weight_grad and dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)  # in place: no weight-sized temporary
            elif want_weight_grad:
                # Per-chunk products in the compute dtype, summed in fp32: the precision of the unfused
                # path, whose weight gradient is one compute-dtype matmul accumulated into an fp32 .grad.
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: these tensors exist only to be returned here (backward runs once per forward).
        grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if not ctx.needs_input_grad[1]:
            return grad_hidden, None, None, None
        return grad_hidden, grad_weight.mul_(grad_output.to(grad_weight.dtype)), None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """sum over non-ignored positions of cross_entropy(hidden @ weight.T, labels), in fp32.

    hidden (..., D), weight (V, D) (the output head's), labels (...) with IGNORE_INDEX where there is no loss.
    Equal to `cross_entropy_sum(lm_head(hidden), labels)` up to rounding, with a fraction of the memory."""
    return _LinearCrossEntropySum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                        chunk_tokens)

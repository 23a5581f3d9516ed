"""Log-likelihood of token continuations under a model: the one forward pass that perplexity and lm_eval's
loglikelihood requests share."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cybertron.models.llama import Transformer

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@torch.no_grad()
def score_continuations(model: Transformer, pairs: Sequence[Pair], batch_size: int) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability of the continuation given the context, and
    whether greedy decoding would have produced it. A pair longer than the model's context keeps its last
    max_seq_len + 1 tokens (as lm_eval's Hugging Face model does). Rows of a batch are right-padded: under the
    causal mask padding after a row's last token cannot change its scores."""
    limit = model.config.max_seq_len
    device = next(model.parameters()).device
    # Longest first, so each batch's first row sets its padded length and similar lengths share a batch.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        inputs, lengths = [], []
        for i in rows:
            context, continuation = pairs[i]
            if not context or not continuation or len(continuation) > limit:
                raise ValueError(f"pair {i} needs a context of at least one token and a continuation of 1 to "
                                 f"{limit} tokens, got {len(context)} and {len(continuation)}")
            whole = (list(context) + list(continuation))[-(limit + 1):]
            inputs.append(whole[:-1])
            lengths.append(len(whole) - 1)
        tokens = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for r, ids in enumerate(inputs):
            tokens[r, :len(ids)] = torch.tensor(ids)
        logprobs = model(tokens.to(device)).float().log_softmax(-1)
        for r, i in enumerate(rows):
            continuation = torch.tensor(list(pairs[i][1]), device=device)
            n, k = lengths[r], len(continuation)
            row = logprobs[r, n - k:n]
            total = row.gather(-1, continuation[:, None]).sum().item()
            results[i] = (total, bool((row.argmax(-1) == continuation).all()))
    return results

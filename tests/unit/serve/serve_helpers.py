"""Reference computations for the serving tests (imported by the test modules beside it)."""

import torch


def random_prompts(lengths, vocab=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy_reference(model, prompt, n):
    """No cache at all: the argmax of a full forward over everything so far, one token at a time."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]

"""A tiny model whose greedy continuation is written down in advance, for tests of where generation stops.

Every block's output projections are zero, so the residual stream at a position is the embedding of the
token there; each scripted token gets its own basis vector as embedding, and the output head maps that
vector to the token's successor. Greedy decoding then walks `successor` exactly, whatever came before, in
cybertron's engine and (after export) in `transformers` alike."""

from __future__ import annotations

from pathlib import Path

import torch

from cybertron.data.tokenizer import TextTokenizer
from cybertron.models.llama import Transformer, build_model
from cybertron.models.presets import preset_config
from cybertron.train import checkpoint as ckpt_io


def scripted_model(vocab_size: int, successor: dict[int, int]) -> Transformer:
    """The `debug` shape (untied head) where greedy decoding after token t emits successor[t]."""
    model = build_model(preset_config("debug", vocab_size=vocab_size, tie_embeddings=False), seed=0).eval()
    assert len(successor) <= model.config.dim
    with torch.no_grad():
        for block in model.layers.values():
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (token, nxt) in enumerate(successor.items()):
            model.embed_tokens.weight[token] = 0.0
            model.embed_tokens.weight[token, i] = 1.0
            # after the final RMSNorm the one-hot is sqrt(dim) large: every other logit is 0, this one is >> 1
            model.lm_head.weight[nxt, i] = 10.0
    return model


def write_scripted_run(run_dir: Path, tokenizer: TextTokenizer, successor: dict[int, int]) -> Path:
    """A run directory as `cybertron train` leaves it (checkpoint + tokenizer) holding scripted_model."""
    model = scripted_model(tokenizer.vocab_size, successor)
    tokenizer.save(run_dir)
    ckpt_io.save_checkpoint(run_dir, 1, model, None, {}, model.config, keep=1)
    return run_dir

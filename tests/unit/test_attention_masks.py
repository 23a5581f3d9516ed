"""Attention without a dense mask (models/masks.py) against SDPA over the dense (B, 1, T, T) mask: packed
documents, padding runs, sliding windows, forward and backward; and the model's loss on packed rows against
the dense-mask path and against each document run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cybertron.models.config import ModelConfig
from cybertron.models.llama import build_model, document_causal_mask
from cybertron.models.masks import AttentionMask, dense_attention_mask, masked_attention


def _packed_positions() -> torch.Tensor:
    # Row 0: documents of 7, 12 and 5 tokens, then 6 padding tokens (positions 0); row 1: 20 then 10.
    row0 = [*range(7), *range(12), *range(5), *[0] * 6]
    row1 = [*range(20), *range(10)]
    return torch.tensor([row0, row1])


def _dense_reference(q, k, v, mask):
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def _qkv(b, t, heads=4, kv_heads=2, hd=8):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, t, n, hd, generator=gen, dtype=torch.float64, requires_grad=True)
            for n in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("window", [None, 4, 7])
@pytest.mark.parametrize("packed", [True, False])
def test_masked_attention_equals_dense_mask_forward_and_backward(window, packed):
    positions = _packed_positions()
    b, t = positions.shape
    mask = AttentionMask.from_positions(positions, window) if packed else AttentionMask(window=window)
    dense = mask.dense(t, b)
    if packed and window is None:
        assert torch.equal(dense, document_causal_mask(positions))  # the model's former mask
    q, k, v = _qkv(b, t)
    ours = masked_attention(q, k, v, mask)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=ours.dtype)
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    ref = _dense_reference(q, k, v, dense)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_window_mask_is_transformers_convention():
    # Key j is visible to query i iff i - window < j <= i: `window` keys, the query's own included.
    dense = AttentionMask(window=3).dense(6)[0, 0]
    assert dense[5].tolist() == [False, False, False, True, True, True]
    assert dense[1].tolist() == [True, True, False, False, False, False]


def test_padding_runs_are_one_segment():
    mask = AttentionMask.from_positions(_packed_positions())
    assert mask.segments[0] == ((0, 7, False), (7, 19, False), (19, 24, False), (24, 30, True))
    assert mask.segments[1] == ((0, 20, False), (20, 30, False))


def _tiny(**changes):
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, **changes)
    return build_model(cfg, seed=0)


def _dense_path_logits(model, tokens, positions):
    # The model's former forward: every block under the dense (B, 1, T, T) document mask.
    h = model.embed_tokens(tokens)
    cos, sin = model._rotary()(positions, h.dtype)  # (h5 merge: the rotary object replaced _inv_freq)
    dense = document_causal_mask(positions)
    for block in model.layers.values():
        h = block(h, cos, sin, dense)
    return model.lm_head(model.norm(h))


def test_packed_loss_equals_dense_mask_path_and_documents_alone():
    model = _tiny()
    positions = _packed_positions()
    tokens = torch.randint(0, 97, positions.shape, generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, 1)
    logits = model(tokens, positions=positions)
    dense_logits = _dense_path_logits(model, tokens, positions)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    dense_loss = F.cross_entropy(dense_logits.flatten(0, 1), labels.flatten())
    assert abs(loss.item() - dense_loss.item()) < 1e-6
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-5)
    # Independent of any mask: every document (and padding token) run alone, unpacked.
    for r, segments in enumerate(AttentionMask.from_positions(positions).segments):
        for a, b, singles in segments:
            pieces = [(i, i + 1) for i in range(a, b)] if singles else [(a, b)]
            for s, e in pieces:
                alone = model(tokens[r:r + 1, s:e])
                torch.testing.assert_close(logits[r:r + 1, s:e], alone, rtol=0, atol=1e-5)


def test_sliding_window_model_differs_from_full_only_past_the_window():
    full, sliding = _tiny(), _tiny(sliding_window=5)
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    a, b = full(tokens), sliding(tokens)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().amax() > 1e-4


def test_layer_types_choose_which_layers_slide():
    cfg = ModelConfig(n_layers=3, sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention"])
    assert [cfg.layer_window(i) for i in range(3)] == [8, None, 8]
    assert ModelConfig(n_layers=2, sliding_window=8).layer_window(1) == 8
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig(n_layers=2, sliding_window=8, layer_types=["full_attention"]).validate()


def test_dense_attention_mask_equals_the_segment_mask():
    positions = _packed_positions()
    for window in (None, 4):
        want = AttentionMask.from_positions(positions, window).dense(30, 2)
        assert torch.equal(dense_attention_mask(positions, window, 30, "cpu"), want)


@pytest.mark.slow  # dynamo tracing: ~9 s on 2 shared cores
def test_a_compiled_block_gets_a_dense_mask_and_no_recompile_per_packing():
    # Document boundaries are host ints: handed to a compiled block they would recompile it for each packing.
    torch._dynamo.reset()
    model = _tiny(sliding_window=6)
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    other = torch.tensor([[*range(13), *range(17)], [*range(30)]])
    expected = [model(tokens, positions=p) for p in (_packed_positions(), other)]
    for block in model.layers.values():
        block.compile(backend="eager", dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=False), torch.no_grad():
        got = [model(tokens, positions=p) for p in (_packed_positions(), other)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] <= 1

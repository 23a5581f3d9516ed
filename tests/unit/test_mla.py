"""Multi-head latent attention (models/mla.py) and its latent cache (serve/latent_cache.py) on a tiny random
DeepSeek shape: the cached path (latent stored, attention in latent space) gives the plain path's logits
token by token; shapes and refusals. Parity with transformers lives in tests/parity/test_deepseek_*.py."""

import pytest
import torch

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.latent_cache import LatentKVCache


def _tiny(**overrides):
    return preset_config("deepseek-moe", vocab_size=97, n_layers=3, **overrides)


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_latent_cache_prefill_then_decode_matches_the_plain_forward(q_lora_rank):
    cfg = _tiny(q_lora_rank=q_lora_rank)
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    cache = LatentKVCache(cfg, num_blocks=8, block_size=4)
    for seq in (0, 1):
        cache.reserve(seq, 11)
    with torch.no_grad():
        want = model(tokens)
        # both rows prefilled with 7 tokens (fresh path), then decoded one token at a time (gathered + mask)
        batch = cache.batch([0, 1], [0, 0], [7, 7])
        got = [model(tokens[:, :7], batch.positions, cache=batch)]
        for p in range(7, 11):
            batch = cache.batch([0, 1], [p, p], [1, 1])
            got.append(model(tokens[:, p:p + 1], batch.positions, cache=batch))
    assert (torch.cat(got, dim=1) - want).abs().max() <= 1e-5


def test_pool_holds_one_latent_per_token_and_counts_parameters():
    cfg = _tiny()
    cache = LatentKVCache(cfg, num_blocks=3, block_size=4)
    assert cache.k.shape == (3, 4, 4, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim) and cache.v.numel() == 0
    for q_lora_rank in (48, None):
        c = _tiny(q_lora_rank=q_lora_rank)
        assert c.num_params() == sum(p.numel() for p in build_model(c, seed=0).parameters())


@pytest.mark.parametrize("overrides, field", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "model.rope_scaling"),
    (dict(n_group=3), "model.n_group"),
    (dict(topk_group=5), "model.topk_group"),
    (dict(qk_rope_head_dim=0), "model.qk_rope_head_dim"),
])
def test_impossible_shapes_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        _tiny(**overrides).validate()


def test_tensor_parallelism_is_refused_for_mla_in_one_line():
    from cybertron.errors import ConfigError, UserError
    from cybertron.parallel.dims import ParallelDims
    from cybertron.serve.tensor_parallel import check_tp_degree

    cfg = _tiny()
    ParallelDims.resolve(4, ep=2).validate_model(cfg)  # expert parallelism composes
    with pytest.raises(ConfigError, match="model.kv_lora_rank"):
        ParallelDims.resolve(2, tp=2).validate_model(cfg)
    with pytest.raises(UserError, match="--tp 2"):
        check_tp_degree(cfg, 2)

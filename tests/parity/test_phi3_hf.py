"""Phi-3 against `transformers`: fused qkv_proj / gate_up_proj split on load and fused again on export,
LongRoPE with partial rotary, logits within 1e-5 on both sides of the original context, greedy serving equal to
transformers generate across it (HF recomputes its whole cache with the long factors when a sequence outgrows
the original context; the engine recomputes that sequence's KV the same way)."""

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from cybertron.errors import UserError  # noqa: E402
from cybertron.models.hf import load_hf_model, save_hf_model  # noqa: E402
from cybertron.serve.engine import Engine  # noqa: E402
from cybertron.serve.sampling import SamplingParams  # noqa: E402
from cybertron.serve.speculative import SpeculativeConfig  # noqa: E402

PAIRS = 6  # rotary pairs of a 16-wide head with partial_rotary_factor 0.75
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=48, original_max_position_embeddings=24,
              partial_rotary_factor=0.75, rope_theta=50.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.2 * i for i in range(PAIRS)],
                            "long_factor": [2.0 + i for i in range(PAIRS)]})


def _phi3(path, scale=1.0, **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(**{**CONFIG, **overrides}),
                                                          attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.mul_(scale)
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def _diff(a, ours, length):
    tokens = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        return (a(tokens).logits - ours(tokens)).abs().max().item()


@pytest.mark.parametrize("window", [None, 7])
def test_phi3_logits_and_export_match_transformers(tmp_path, window):
    hf = _phi3(tmp_path / "hf", sliding_window=window)  # Phi-3-mini slides every layer (2047 in its config)
    ours = load_hf_model(tmp_path / "hf").eval()
    assert "layers.0.self_attn.q_proj.weight" in ours.state_dict()
    for length in (12, 40):  # short factors, then long ones (past original_max_position_embeddings)
        assert _diff(hf, ours, length) <= 1e-5
    save_hf_model(ours.state_dict(), ours.config, tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.qkv_proj.weight" in f.keys()  # fused again, as Phi-3 stores it
        assert "model.layers.0.mlp.gate_up_proj.weight" in f.keys()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    for length in (12, 40):
        assert _diff(back, ours, length) <= 1e-5


def test_phi3_greedy_serving_matches_transformers_across_the_long_factor_switch(tmp_path):
    """original_max_position_embeddings is 24: one prompt stays below it, one crosses it while decoding, one
    crosses right after its prefill (24 tokens), one is past it from the start (prefilled in chunks of 8, each
    with the long factors, as HF's one-call prefill). Twice: the second time from the prefix cache, whose
    short- and long-factor blocks must not mix."""
    hf = _phi3(tmp_path / "hf", scale=3.0)  # sharper distributions: argmax ties implausible
    hf.generation_config.eos_token_id = None
    ours = load_hf_model(tmp_path / "hf")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 11, 24, 30)]
    new_tokens = 18  # the longest reaches 48, max_position_embeddings
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    engine = Engine(ours, max_batch_size=3, num_blocks=40, block_size=8, max_prefill_tokens=8)
    for _ in range(2):
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens))
        assert [r.token_ids for r in results] == expected
    assert engine.stats.prefix_hit_tokens >= 24 + 16
    with pytest.raises(UserError, match="context of 48"):
        engine.generate([prompts[3]], SamplingParams(temperature=0.0, max_tokens=new_tokens + 1))


def test_speculative_serving_stops_at_the_switch_in_one_line(tmp_path):
    _phi3(tmp_path / "hf")
    engine = Engine(load_hf_model(tmp_path / "hf"), max_batch_size=1, num_blocks=8, block_size=8,
                    speculative=SpeculativeConfig("ngram", k=2))
    with pytest.raises(UserError, match="original context \\(24 tokens") as err:
        engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=22))
    assert "\n" not in str(err.value)
    assert len(engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=21))[0].token_ids) == 21

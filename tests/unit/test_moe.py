"""The MoE block against a naive per-token reference: each token through its k experts one at a time."""

import pytest
import torch
import torch.nn.functional as F

from cybertron.models.config import ModelConfig
from cybertron.models.llama import build_model
from cybertron.models.moe import GroupedExperts, MoE


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, n_experts=6, top_k=2,
                moe_ffn_dim=16)
    return ModelConfig(**{**base, **kw})


def _built_moe(cfg: ModelConfig) -> MoE:
    model = build_model(cfg, seed=0)
    return model.layers["0"].mlp


def _naive(moe: MoE, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    out = torch.zeros_like(x)
    bias = moe.gate.e_score_correction_bias
    for n in range(x.shape[0]):
        logits = moe.gate.weight @ x[n]
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores if bias is None else scores + bias, cfg.top_k).indices
        w = scores[chosen]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        for e, we in zip(chosen.tolist(), w):
            ex = moe.experts
            h = F.silu(ex.gate_proj[e] @ x[n]) * (ex.up_proj[e] @ x[n])
            out[n] += we * (ex.down_proj[e] @ h)
        if moe.shared_expert is not None:
            s = moe.shared_expert(x[n])
            if moe.shared_expert_gate is not None:
                s = torch.sigmoid(moe.shared_expert_gate(x[n])) * s
            out[n] += s
    return out


@pytest.mark.parametrize("kw", [
    {},
    {"norm_topk_prob": False, "top_k": 3},
    {"score_func": "sigmoid", "routed_scaling_factor": 2.5, "shared_ffn_dim": 24},
    {"shared_ffn_dim": 24, "shared_expert_gate": True, "top_k": 1},
    {"bias_update_rate": 1e-3},
])
def test_moe_matches_per_token_reference(kw):
    cfg = _cfg(**kw)
    moe = _built_moe(cfg)
    if moe.gate.e_score_correction_bias is not None:  # a bias that changes which experts win
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, cfg.n_experts))
    x = torch.randn(2, 7, cfg.dim, generator=torch.Generator().manual_seed(1))
    got = moe(x)
    want = _naive(moe, x.reshape(-1, cfg.dim), cfg).reshape(x.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_experts_gradients_match_per_expert_loop():
    torch.manual_seed(0)
    ex = GroupedExperts(4, 8, 12)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, requires_grad=True)
    ex(x, counts).square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in ex.parameters()]
    x.grad = None
    ex.zero_grad()
    outs = []
    for e, chunk in enumerate(x.split(counts.tolist())):
        outs.append(F.silu(chunk @ ex.gate_proj[e].T) * (chunk @ ex.up_proj[e].T) @ ex.down_proj[e].T)
    torch.cat(outs).square().sum().backward()
    want = [x.grad] + [p.grad for p in ex.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_layer_choice_and_param_count():
    cfg = _cfg(n_layers=4, first_k_dense=1, decoder_sparse_step=1, mlp_only_layers=[2], shared_ffn_dim=8,
               shared_expert_gate=True, bias_update_rate=0.01)
    model = build_model(cfg, device="meta")
    kinds = [type(model.layers[str(i)].mlp).__name__ for i in range(4)]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert "layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    step2 = _cfg(n_layers=4, decoder_sparse_step=2)
    assert [step2.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("kw, needle", [
    ({"top_k": 7}, "model.top_k=7"),
    ({"score_func": "sparsemixer"}, "model.score_func"),
    ({"shared_expert_gate": True}, "model.shared_expert_gate"),
])
def test_bad_moe_config_names_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _cfg(**kw).validate()

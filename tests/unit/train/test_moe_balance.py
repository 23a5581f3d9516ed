"""MoE load balancing in the Trainer: the auxiliary loss joins the gradient, the selection bias moves by
sign(mean load - load) x rate after the step, and the step reports each layer's expert load."""

import torch

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.losses import cross_entropy_sum
from cybertron.train.moe_balance import RouterBalance, balancing_loss
from cybertron.train.trainer import LanguageModelStep, Trainer


def _model(**kw):
    cfg = preset_config("moe", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, **kw)
    return build_model(cfg, seed=0)


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (3, 17), generator=g)
    return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}


def _step(model, lr=1.0):
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), LanguageModelStep(), lambda s: lr, 0.0)
    return trainer.train_step(0, [_batch()])


def test_auxiliary_loss_joins_the_gradient():
    coef = 0.5
    model, reference = _model(aux_loss_coef=coef), _model(aux_loss_coef=coef)
    _step(model)
    # By hand: mean CE + coef x aux over the routing of both layers, one SGD step with lr 1.
    batch = _batch()
    reference.train()
    ce = cross_entropy_sum(reference(batch["inputs"]), batch["labels"]) / batch["labels"].numel()
    balance = RouterBalance.of(reference)
    aux = balancing_loss(balance._drain(), 8)
    (ce + coef * aux).backward()
    with torch.no_grad():
        for (name, p), q in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p - p.grad, msg=name)
    # and the aux term is not a no-op: without it the router weights end elsewhere
    plain = _model(aux_loss_coef=0.0)
    _step(plain)
    assert not torch.allclose(plain.layers["0"].mlp.gate.weight, model.layers["0"].mlp.gate.weight)


def test_balancing_loss_is_one_when_perfectly_balanced_and_uniform():
    from cybertron.models.moe import RouterStats

    n, e, k = 16, 4, 2
    stats = [[RouterStats(torch.full((e,), n / e), torch.full((e,), n * k / e), n)]]
    assert abs(balancing_loss(stats, e).item() - k) < 1e-6  # E x sum(k/E x 1/E) = k


def test_bias_moves_against_the_load_and_metrics_report_it():
    rate = 0.01
    model = _model(bias_update_rate=rate)
    model.train()
    batch = _batch()
    model(batch["inputs"])  # the same weights and batch route as the step will
    loads = [s[0].counts for s in RouterBalance.of(model)._drain()]
    result = _step(model, lr=0.0)  # lr 0: the weights stay, only the bias moves
    for i, load in enumerate(loads):
        bias = model.layers[str(i)].mlp.gate.e_score_correction_bias
        torch.testing.assert_close(bias, torch.sign(load.mean() - load) * rate)
        assert abs(result.moe[f"moe_load_max_mean_{i}"] - (load.max() / load.mean()).item()) < 1e-6
    assert result.moe["moe_aux_loss"] > 0
    assert "layers.0.mlp.gate.e_score_correction_bias" in model.state_dict()  # checkpointed with the weights


def test_no_grad_and_eval_forwards_record_nothing():
    model = _model()
    tokens = _batch()["inputs"]
    with torch.no_grad():
        model(tokens)
    model.eval()
    model(tokens)
    assert all(not m.router_stats for _, m in RouterBalance.of(model).layers)


def test_auxiliary_loss_under_a_pipeline_schedule_is_refused():
    import pytest

    from cybertron.errors import ConfigError

    class Schedule:  # any strategy but the micro-batch loop: the loss lives on the last stage only
        pass

    model = _model(aux_loss_coef=0.01)
    with pytest.raises(ConfigError, match="model.aux_loss_coef"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), LanguageModelStep(), lambda s: 1.0, 0.0,
                strategy=Schedule())

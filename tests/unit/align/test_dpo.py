"""The preference step against independent references: `transformers` log-probabilities of the same weights,
closed-form losses computed here, ln 2 at the start, exact gradient accumulation, and the effect of DPO on
a synthetic preference the base model lacks."""

import contextlib
import json
import math
import random

import pytest
import torch

from cybertron.align.dpo import PreferenceStep, pair_batches, reference_logprobs
from cybertron.align.preference_data import build_preference_data
from cybertron.config import parse_args
from cybertron.data.tokenizer import TextTokenizer
from cybertron.finetune.config import MethodSection
from cybertron.finetune.lora import lora_modules
from cybertron.finetune.model import build_finetune_model
from cybertron.models.hf import load_hf_model
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import Trainer

transformers = pytest.importorskip("transformers")

from cybertron.align.config import AlignConfig, validate  # noqa: E402
from cybertron.commands.align import run as run_align  # noqa: E402
from tests.unit.finetune.tiny_hf import WORDS, make_hf_dir  # noqa: E402

COLORS, ANIMALS = ("red", "blue", "green"), ("cat", "dog")


def write_color_pairs(path, n, seed):
    """Prefer replies made of colour words over replies made of animal words: a preference a random base
    model does not have (its implicit reward accuracy starts at chance)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
                                "chosen": " " + " ".join(rng.choice(COLORS) for _ in range(3)),
                                "rejected": " " + " ".join(rng.choice(ANIMALS) for _ in range(3))}) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def pairs(hf_dir, tmp_path_factory):
    path = write_color_pairs(tmp_path_factory.mktemp("data") / "prefs.jsonl", 12, seed=1)
    return build_preference_data(path, TextTokenizer.load(hf_dir), 64, 0.0, seed=0).train


def hf_response_logprobs(hf_dir, ids, mask):
    """Summed log p(response tokens) by transformers itself: the independent reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def lora_model(hf_dir, seed=0):
    return build_finetune_model(load_hf_model(hf_dir), MethodSection(method="lora", rank=4), seed)


def test_reference_is_the_base_with_adapters_disabled(hf_dir, pairs):
    model = lora_model(hf_dir)
    with torch.no_grad():  # adapters that change the output: the reference must not see them
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.5)
    with_ref = reference_logprobs(model, pairs, 5, torch.device("cpu"), contextlib.nullcontext)
    expected_chosen = hf_response_logprobs(hf_dir, pairs["chosen_ids"], pairs["chosen_mask"])
    expected_rejected = hf_response_logprobs(hf_dir, pairs["rejected_ids"], pairs["rejected_mask"])
    torch.testing.assert_close(with_ref["ref_chosen"], expected_chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(with_ref["ref_rejected"], expected_rejected, atol=1e-4, rtol=1e-5)
    assert model.training  # restored
    # ... while the policy (adapters on) scores differently: the adapters are live.
    step = PreferenceStep("dpo")
    _, metrics = step(model, with_ref)
    assert abs(metrics["logp_chosen"].item() - expected_chosen.sum().item()) > 1e-2


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_step_loss_matches_closed_form_on_transformers_logprobs(hf_dir, pairs, method):
    model = build_finetune_model(load_hf_model(hf_dir), MethodSection(method="full"), 0)
    g = torch.Generator().manual_seed(0)
    n = pairs["chosen_ids"].shape[0]
    batch = {**pairs, "ref_chosen": -20 + torch.rand(n, generator=g) * 5,
             "ref_rejected": -20 + torch.rand(n, generator=g) * 5}
    beta, gamma, lam, simpo_beta = 0.3, 0.4, 0.2, 1.5
    step = PreferenceStep(method, beta=beta, simpo_beta=simpo_beta, simpo_gamma=gamma, orpo_lambda=lam)
    loss, metrics = step(model, batch)
    pc = hf_response_logprobs(hf_dir, pairs["chosen_ids"], pairs["chosen_mask"]).double().tolist()
    pr = hf_response_logprobs(hf_dir, pairs["rejected_ids"], pairs["rejected_mask"]).double().tolist()
    nc = pairs["chosen_mask"][:, 1:].sum(-1).tolist()
    nr = pairs["rejected_mask"][:, 1:].sum(-1).tolist()
    rc, rr = batch["ref_chosen"].tolist(), batch["ref_rejected"].tolist()

    def logsig(x):
        return -math.log1p(math.exp(-x))

    expected = 0.0
    for i in range(n):
        if method == "dpo":
            expected -= logsig(beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])))
        elif method == "ipo":
            h = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
            expected += (h - 1 / (2 * beta)) ** 2
        elif method == "simpo":
            expected -= logsig(simpo_beta * (pc[i] / nc[i] - pr[i] / nr[i]) - gamma)
        else:
            ac, ar = pc[i] / nc[i], pr[i] / nr[i]
            log_odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
            expected += -ac - lam * logsig(log_odds)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert metrics["logp_chosen"].item() == pytest.approx(sum(pc), rel=1e-5)


def test_dpo_starts_at_ln2_and_accumulation_is_exact(hf_dir, pairs):
    def one_step(micro):
        model = lora_model(hf_dir, seed=3)
        rows = reference_logprobs(model, pairs, 4, torch.device("cpu"), contextlib.nullcontext)
        trainer = Trainer(model, build_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 1e-8), PreferenceStep("dpo"),
                          lambda s: 1e-2, grad_clip=1.0)
        result = trainer.train_step(0, pair_batches(rows, micro))
        return result, [p.detach().clone() for p in model.parameters() if p.requires_grad]

    whole, weights_whole = one_step(12)
    split, weights_split = one_step(5)  # micro-batches of 5, 5 and 2 pairs
    assert whole.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert split.loss.item() == pytest.approx(whole.loss.item(), abs=1e-6)
    assert split.grad_norm.item() == pytest.approx(whole.grad_norm.item(), rel=1e-5)
    for a, b in zip(weights_whole, weights_split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_dpo_learns_a_preference_the_base_lacks(hf_dir, tmp_path, weights):
    data = write_color_pairs(tmp_path / "prefs.jsonl", 80, seed=2)
    lr = "2e-3" if weights == "lora" else "5e-4"
    cfg = parse_args([f"--model.path={hf_dir}", f"--data.path={data}", f"--run.out={tmp_path / 'run'}",
                      f"--finetune.method={weights}", "--train.steps=25", f"--train.lr={lr}",
                      "--data.val_fraction=0.25", "--eval.every=0", "--eval.batches=4", "--eval.batch_size=5",
                      "--log.progress=lines", "--log.tensorboard=false", "--log.every=5"], AlignConfig())
    validate(cfg)
    run = run_align(cfg)
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 25
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert after["val_reward_margin"] > before["val_reward_margin"] + 0.25
    assert after["val_reward_accuracy"] >= 0.9  # held-out pairs: 20 never trained on
    assert after["val_loss"] < 0.6


def test_pairs_padded_to_a_multiple_of_tp_score_the_same(hf_dir, pairs):
    """Sequence parallelism pads each batch to a multiple of tp: past every row's end (with zeros, beyond the
    dataset's width too), so neither the preference loss nor a reward model's scores change."""
    from cybertron.align.reward import RewardModel, RewardStep

    plain = pair_batches(pairs, 12)[0]
    padded = pair_batches(pairs, 12, multiple=64)[0]
    width = plain["chosen_ids"].shape[1]
    assert padded["chosen_ids"].shape[1] == 64 > pairs["chosen_ids"].shape[1] >= width
    assert not padded["chosen_mask"][:, width:].any() and torch.equal(padded["chosen_len"], plain["chosen_len"])
    policy = build_finetune_model(load_hf_model(hf_dir), MethodSection(method="full"), 0).eval()
    rows = reference_logprobs(policy, pairs, 12, torch.device("cpu"), contextlib.nullcontext)
    with torch.no_grad():
        for step, model, batches in [(PreferenceStep("simpo"), policy, (plain, padded)),
                                     (PreferenceStep("dpo"), policy, pair_batches(rows, 12, 1) +
                                      pair_batches(rows, 12, 64)),
                                     (RewardStep(), RewardModel(load_hf_model(hf_dir), seed=1).eval(),
                                      (plain, padded))]:
            (loss_a, metrics_a), (loss_b, metrics_b) = (step(model, b) for b in batches)
            assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-5)
            for key in metrics_a:  # DPO at its reference: every reward is 0 up to rounding, its accuracy noise
                if not (key == "reward_accuracy" and getattr(step, "method", "") == "dpo"):
                    assert metrics_b[key].item() == pytest.approx(metrics_a[key].item(), abs=1e-4), key


def test_dpo_on_a_mixture_of_experts_adds_the_balancing_loss(tmp_path, pairs):
    from cybertron.models.moe import MoE

    moe_dir = make_hf_dir(tmp_path / "mixtral", "mixtral", output_router_logits=True, router_aux_loss_coef=0.5)

    def one_step(coef):
        model = lora_model(moe_dir, seed=3)
        for m in model.modules():
            if isinstance(m, MoE):
                m.aux_loss_coef = coef
        rows = reference_logprobs(model, pairs, 4, torch.device("cpu"), contextlib.nullcontext)
        trainer = Trainer(model, build_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 1e-8), PreferenceStep("dpo"),
                          lambda s: 1e-2, grad_clip=0.0)
        result = trainer.train_step(0, pair_batches(rows, 6))
        return result, [p.detach().clone() for p in model.parameters() if p.requires_grad]

    with_aux, weights = one_step(0.5)
    without, plain_weights = one_step(0.0)
    assert with_aux.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the logged loss is DPO's alone
    assert {"moe_load_max_mean_0", "moe_load_max_mean_1", "moe_aux_loss"} <= with_aux.moe.keys()
    assert with_aux.moe["moe_aux_loss"] == pytest.approx(without.moe["moe_aux_loss"])  # same first routing
    assert any(not torch.allclose(a, b) for a, b in zip(weights, plain_weights))  # ... but it joins the gradient

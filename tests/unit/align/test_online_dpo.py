"""Online DPO pieces: pairs judged from two rollouts of the engine (the higher reward chosen, ties weightless),
the step's loss against the DPO formula written here on log-probabilities computed here, and the generator's
log-probabilities asserted equal to the trainer's."""

import contextlib
import math

import pytest
import torch

from cybertron.align.dpo import reference_logprobs
from cybertron.align.grpo import LogprobMismatch, generate_rollouts
from cybertron.align.online_dpo import SAMPLES, OnlineDPOStep, preference_rows
from cybertron.align.preference_data import PromptRecord
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine


def _logsig(x):
    return -math.log1p(math.exp(-x))


def _seq_logprob(model, ids, mask):
    """Summed log p of the masked tokens of one row, in float64 from the logits (not next_token_logprobs)."""
    with torch.no_grad():
        logits = model(ids[None]).double()[0]
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None]).squeeze(-1)
    return float((logp * mask[1:]).sum())


def test_pairs_from_engine_rollouts_and_the_step_against_the_dpo_formula():
    torch.manual_seed(0)
    model = build_model(preset_config("debug"), seed=0).eval()
    records = [PromptRecord([5, 17, 42], "a", {}, "x:1"), PromptRecord([9, 3], "b", {}, "x:2"),
               PromptRecord([1, 2, 3, 4, 5, 6], "c", {}, "x:3")]
    engine = Engine(model, None, max_batch_size=8, num_blocks=64, block_size=4, decode_graphs=False)
    results = generate_rollouts(engine, records, SAMPLES, 5, 1.0, 1.0, seed=3, step=0)
    rewards = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 1.0])  # prompt 0: the second wins; prompt 2: a tie
    rows = preference_rows(records, results, rewards, pad_id=0)
    assert rows["pair_weight"].tolist() == [1.0, 1.0, 0.0]
    for row, (chosen, rejected) in enumerate([(1, 0), (2, 3), (4, 5)]):
        p = len(records[row].ids)
        n = rows["chosen_len"][row] - p
        assert rows["chosen_ids"][row, p:p + n].tolist() == results[chosen].token_ids
        assert rows["rejected_ids"][row, p:p + len(results[rejected].token_ids)].tolist() == \
            results[rejected].token_ids
        assert rows["chosen_gen"][row, p:p + n].tolist() == pytest.approx(results[chosen].logprobs)
        assert (rows["chosen_gen"][row, :p] == 0).all()

    # The reference: the same weights before an update; the policy after one, so the log-ratios are not 0.
    rows = reference_logprobs(model, rows, 2, torch.device("cpu"), contextlib.nullcontext)
    beta = 0.2
    step = OnlineDPOStep("dpo", beta, check=True, tolerance=1e-5)
    loss, metrics = step(model, rows)  # on the generator's own weights: the check passes
    assert metrics["logprob_gap"].item() < 1e-5
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-5)  # two weighted pairs at policy = reference
    with pytest.raises(LogprobMismatch, match="row 1"):
        bad = {**rows, "chosen_gen": rows["chosen_gen"].clone()}
        bad["chosen_gen"][1, len(records[1].ids)] -= 1e-3
        step(model, bad)

    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.05)
    step = OnlineDPOStep("dpo", beta)
    loss, metrics = step(model, rows)
    assert step.weight(rows).item() == 2
    expected = 0.0
    for i in range(2):  # the tie (pair 2) adds nothing
        pc = _seq_logprob(model, rows["chosen_ids"][i], rows["chosen_mask"][i])
        pr = _seq_logprob(model, rows["rejected_ids"][i], rows["rejected_mask"][i])
        expected -= _logsig(beta * ((pc - rows["ref_chosen"][i].item()) - (pr - rows["ref_rejected"][i].item())))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert abs(loss.item() - 2 * math.log(2)) > 1e-3


def test_ipo_loss_on_pairs():
    torch.manual_seed(0)
    model = build_model(preset_config("debug"), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 200, (4, 7), generator=g)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[:, 3:] = True
    mask[1, 6:] = False
    batch = {"chosen_ids": ids[:2], "rejected_ids": ids[2:], "chosen_mask": mask[:2], "rejected_mask": mask[2:],
             "chosen_gen": torch.zeros(2, 7), "rejected_gen": torch.zeros(2, 7), "pair_weight": torch.ones(2),
             "ref_chosen": torch.tensor([-30.0, -25.0]), "ref_rejected": torch.tensor([-28.0, -31.0])}
    beta = 0.1
    loss, _ = OnlineDPOStep("ipo", beta)(model, batch)
    expected = 0.0
    for i in range(2):
        nc, nr = int(mask[i, 1:].sum()), int(mask[2 + i, 1:].sum())
        h = ((_seq_logprob(model, ids[i], mask[i]) - batch["ref_chosen"][i].item()) / nc
             - (_seq_logprob(model, ids[2 + i], mask[2 + i]) - batch["ref_rejected"][i].item()) / nr)
        expected += (h - 1 / (2 * beta)) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)

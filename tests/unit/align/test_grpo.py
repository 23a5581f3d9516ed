"""GRPO pieces: group advantages and the clipped, KL-penalised loss against formulas written here; the
engine's log-probabilities against the trainer's; and reward sources that fail loudly, naming the sample."""

import contextlib
import math

import pytest
import torch

from cybertron.align.grpo import (
    GRPOStep,
    LogprobMismatch,
    generate_rollouts,
    group_advantages,
    rollout_checksum,
    rollout_rows,
    token_logprobs,
)
from cybertron.align.preference_data import PromptRecord
from cybertron.align.rewards import FunctionReward, RewardError, load_reward_function
from cybertron.errors import UserError
from cybertron.finetune.lora import LoRASpec, apply_lora, lora_modules
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine, Result
from cybertron.train.losses import next_token_logprobs


def test_group_advantages_closed_form():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, scale=True, eps=0.0)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # unbiased std of [1, 0, 0, 0]
    expected = [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)  # an all-equal group carries no signal
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.75, -.25, -.25, -.25, 0, 0, 0, 0])


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(preset_config("debug"), seed=0)


def _batch(n=4, t=9, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t), generator=g)
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[:, prompt:] = True
    mask[1, 7:] = False  # a shorter completion (padding after it)
    return {"seq_ids": ids, "seq_mask": mask, "advantages": torch.tensor([1.5, -0.5, 0.0, -1.0])[:n]}


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_on_policy_gradient_is_reinforce_with_kl(model):
    batch = _batch()
    with torch.no_grad():
        ref = torch.nn.functional.pad(next_token_logprobs(model(batch["seq_ids"]), batch["seq_ids"]), (1, 0)) - 0.3
    batch["ref_logprobs"] = ref
    step = GRPOStep(kl_coef=0.1, loss_type="token")
    loss, metrics = step(model, batch)
    # Independent form: -sum A_i logp_it + 0.1 * sum k3(ref, logp), with the ratio = 1 (no old log-probs).
    logp = next_token_logprobs(model(batch["seq_ids"]), batch["seq_ids"])
    mask = batch["seq_mask"][:, 1:].float()
    delta = ref[:, 1:] - logp
    k3 = torch.exp(delta) - delta - 1
    expected = (-(batch["advantages"][:, None] * logp) + 0.1 * k3) * mask
    ref_grads = _grads(model, expected.sum())
    # The loss value: -A (ratio 1) + 0.1 k3 per token.
    value = ((-batch["advantages"][:, None] + 0.1 * k3.detach()) * mask).sum()
    assert loss.item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx((k3.detach() * mask).sum().item(), rel=1e-5)
    assert step.weight(batch).item() == mask.sum().item()
    for got, want in zip(_grads(model, loss), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_clipping_stops_gradient_only_where_the_ratio_left_the_range_in_the_advantage_direction(model):
    batch = _batch()
    with torch.no_grad():
        logp = next_token_logprobs(model(batch["seq_ids"]), batch["seq_ids"])
    batch["old_logprobs"] = torch.nn.functional.pad(logp - 1.0, (1, 0))  # ratio e > 1 + eps everywhere
    step = GRPOStep(clip_eps=0.2, kl_coef=0.0)
    loss, metrics = step(model, batch)
    mask = batch["seq_mask"][:, 1:].float()
    adv = batch["advantages"][:, None]
    # A > 0: clipped at 1.2 (constant, no gradient); A <= 0: min picks ratio * A (gradient flows).
    ratio = torch.exp(next_token_logprobs(model(batch["seq_ids"]), batch["seq_ids"]) - logp + 1.0)
    expected = (-torch.where(adv > 0, 1.2 * adv * torch.ones_like(ratio), ratio * adv) * mask)
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert metrics["clip_fraction"].item() == pytest.approx(mask.sum().item())  # every token's ratio is outside
    for got, want in zip(_grads(model, loss), _grads(model, expected.sum())):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_sequence_loss_is_a_mean_per_completion(model):
    batch = _batch()
    token_loss, _ = GRPOStep(kl_coef=0.0, loss_type="token")(model, batch)
    seq_step = GRPOStep(kl_coef=0.0, loss_type="sequence")
    seq_loss, _ = seq_step(model, batch)
    counts = batch["seq_mask"][:, 1:].sum(-1).float()
    assert seq_loss.item() == pytest.approx(-(batch["advantages"]).sum().item(), rel=1e-6)
    assert token_loss.item() == pytest.approx(-(batch["advantages"] * counts).sum().item(), rel=1e-6)
    assert seq_step.weight(batch).item() == 4


def _records():
    return [PromptRecord([5, 17, 42], "a", {}, "x:1"), PromptRecord([9, 3], "b", {}, "x:2"),
            PromptRecord([1, 2, 3, 4, 5, 6], "c", {}, "x:3")]


@pytest.mark.parametrize("adapters", [False, True])
def test_engine_logprobs_equal_the_trainers(model, adapters):
    if adapters:
        apply_lora(model, LoRASpec(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]), seed=0)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B.normal_(0, 0.2)
    records = _records()
    engine = Engine(model, None, max_batch_size=16, num_blocks=64, block_size=4, decode_graphs=False)
    results = generate_rollouts(engine, records, 4, 7, 1.0, 1.0, seed=3, step=0)
    assert len(results) == 12 and all(len(r.token_ids) == 7 for r in results)  # no tokenizer: no eos stop
    rows = rollout_rows(records, results, torch.zeros(12), 4, pad_id=0)
    trainer_logp = token_logprobs(model, rows, 5, torch.device("cpu"), contextlib.nullcontext)
    mask = rows["seq_mask"]
    gap = ((trainer_logp - rows["gen_logprobs"]).abs() * mask).max().item()
    assert gap < 1e-5
    assert (rows["gen_logprobs"][~mask] == 0).all() and (rows["gen_logprobs"][mask] < 0).all()
    # The same rows through the step's own check: passes as is, fails loudly when they disagree.
    step = GRPOStep(kl_coef=0.0, check=True, tolerance=1e-5)
    model.eval()
    step(model, {k: v for k, v in rows.items()})
    rows["gen_logprobs"][2, mask[2].nonzero()[0]] -= 1e-3
    with pytest.raises(LogprobMismatch, match="row 2"):
        step(model, rows)


def test_rollouts_repeat_exactly_for_a_seed_and_step(model):
    engine = Engine(model, None, max_batch_size=16, num_blocks=64, block_size=4, decode_graphs=False)
    first = generate_rollouts(engine, _records(), 3, 5, 1.0, 1.0, seed=1, step=7)
    again = generate_rollouts(engine, _records(), 3, 5, 1.0, 1.0, seed=1, step=7)
    other = generate_rollouts(engine, _records(), 3, 5, 1.0, 1.0, seed=1, step=8)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    assert len({tuple(r.token_ids) for r in first[:3]}) > 1  # a group samples different completions



def test_rollouts_after_a_weight_update_use_no_stale_prefix_cache(model):
    """The engine lives across optimizer steps: KV cached under the old weights must not be reused."""
    records = [PromptRecord(list(range(1, 12)), "p", {}, "x:1")]  # two full blocks of 4, then a partial one
    engine = Engine(model, None, max_batch_size=16, num_blocks=64, block_size=4, decode_graphs=False)
    generate_rollouts(engine, records, 3, 5, 1.0, 1.0, seed=1, step=0)
    assert engine.stats.prefix_hit_tokens == 2 * 8  # the group's other two copies shared the prompt's blocks
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    after = generate_rollouts(engine, records, 3, 5, 1.0, 1.0, seed=1, step=1)
    fresh = Engine(model, None, max_batch_size=16, num_blocks=64, block_size=4, decode_graphs=False)
    expected = generate_rollouts(fresh, records, 3, 5, 1.0, 1.0, seed=1, step=1)
    assert [r.logprobs for r in after] == [r.logprobs for r in expected]

# ---- reward sources -------------------------------------------------------------------------------------

def _call(fn, completions=("1", "2", "3")):
    reward = FunctionReward(fn, "r.py:f")
    n = len(completions)
    return reward(4, ["p"] * n, list(completions), [{"answer": str(i)} for i in range(n)], [[1]] * n)


def test_reward_function_gets_fields_as_columns():
    got = _call(lambda prompts, completions, answer: [float(c == a) for c, a in zip(completions, answer)],
                completions=("0", "x", "2"))
    assert got == [1.0, 0.0, 1.0]


def test_reward_function_that_raises_is_reported_with_the_sample():
    def fn(prompts, completions, **fields):
        return [1.0 / (int(c) - 2) for c in completions]

    with pytest.raises(RewardError, match=r"step 4: reward function r.py:f raised ZeroDivisionError.* sample 1 "
                                          r"\(prompt 'p', completion '2'\)"):
        _call(fn)


@pytest.mark.parametrize("value, shown", [("high", "'high'"), (None, "None"), (float("nan"), "nan"),
                                          (True, "True")])
def test_reward_function_returning_a_non_number_is_reported(value, shown):
    with pytest.raises(RewardError, match=rf"step 4: .* returned {shown} .* for sample 2 .*completion '3'"):
        _call(lambda prompts, completions, **f: [0.5, 1, value])


def test_reward_function_returning_the_wrong_count_or_type():
    with pytest.raises(RewardError, match="returned 2 values for 3 completions"):
        _call(lambda prompts, completions, **f: [1.0, 2.0])
    with pytest.raises(RewardError, match="returned float, not a list"):
        _call(lambda prompts, completions, **f: 1.0)
    assert _call(lambda prompts, completions, **f: torch.tensor([1.0, 2.0, 3.0])) == [1.0, 2.0, 3.0]


def test_loading_reward_functions(tmp_path):
    (tmp_path / "r.py").write_text("def good(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
                                   "VALUE = 3\n")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    assert load_reward_function(f"{tmp_path / 'r.py'}:good").fn(["a"], ["b"]) == [1.0]
    for spec, fragment in [(f"{tmp_path / 'r.py'}:missing", "has no function 'missing'.*good"),
                           (f"{tmp_path / 'r.py'}:VALUE", "has no function 'VALUE'"),
                           (f"{tmp_path / 'nope.py'}:f", "does not exist"),
                           (str(tmp_path / "r.py"), "expected FILE.py:FUNCTION"),
                           (f"{tmp_path / 'broken.py'}:f", "importing .* failed: ModuleNotFoundError")]:
        with pytest.raises(UserError, match=fragment):
            load_reward_function(spec)


def test_rollout_checksum_tells_different_completions_apart():
    def results(*completions):
        return [Result(list(c), [0.0] * len(c), "stop") for c in completions]

    base = rollout_checksum(results([1, 2], [3]))
    assert base == rollout_checksum(results([1, 2], [3]))
    for other in ([[1], [2, 3]], [[1, 2, 3], []], [[2, 1], [3]], [[1, 2], [4]], [[3], [1, 2]], [[1, 2]]):
        assert rollout_checksum(results(*other)) != base

"""KTO: the loss and its reference point z_ref against closed forms written here with plain math, the step on a
real model against `transformers` log-probabilities, the data formats and their one-line errors."""

import contextlib
import json
import math

import pytest
import torch

from cybertron.align.dpo import response_logprobs
from cybertron.align.kto import (
    KTOStep,
    attach_reference_point,
    kto_batches,
    kto_reference,
    kto_rows,
    read_kto_records,
)
from cybertron.align.losses import kto_loss, kto_reference_point
from cybertron.errors import DataError
from cybertron.finetune.config import MethodSection
from cybertron.finetune.model import build_finetune_model
from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.runtime import DistEnv
from cybertron.parallel.world import World
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import Trainer

transformers = pytest.importorskip("transformers")

from cybertron.data.tokenizer import TextTokenizer  # noqa: E402
from cybertron.models.hf import load_hf_model  # noqa: E402
from tests.unit.align.test_dpo import ANIMALS, COLORS, hf_response_logprobs  # noqa: E402
from tests.unit.finetune.tiny_hf import WORDS, make_hf_dir  # noqa: E402


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# Four completions: policy and reference summed log-probabilities, labels; and three mismatched pairs.
POLICY, REF, LABELS = [-10.0, -12.0, -9.0, -14.0], [-11.0, -11.5, -9.5, -13.0], [True, False, True, False]
KL_POLICY, KL_REF = [-20.0, -18.0, -25.0], [-20.6, -18.3, -24.7]


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_kto_loss_and_reference_point_closed_form():
    beta, lam_d, lam_u = 0.2, 1.5, 0.75
    z = max(0.0, sum(p - r for p, r in zip(KL_POLICY, KL_REF)) / 3)  # (0.6 + 0.3 - 0.3) / 3 = 0.2
    assert z == pytest.approx(0.2)
    got_z = kto_reference_point(_t(KL_POLICY).sum(), _t(KL_REF).sum(), _t(3.0))
    assert got_z.item() == pytest.approx(z, abs=1e-12)
    losses, rewards = kto_loss(_t(POLICY), _t(REF), torch.tensor(LABELS), got_z, beta, lam_d, lam_u)
    for i, (p, r, good) in enumerate(zip(POLICY, REF, LABELS)):
        expected = lam_d * (1 - _sig(beta * ((p - r) - z))) if good else lam_u * (1 - _sig(beta * (z - (p - r))))
        assert losses[i].item() == pytest.approx(expected, abs=1e-12)
        assert rewards[i].item() == pytest.approx(beta * (p - r), abs=1e-12)


def test_reference_point_clamps_at_zero_and_carries_no_gradient():
    # A mean log-ratio below 0 (an impossible KL, sampling noise) is clamped to 0, as the paper and TRL do.
    assert kto_reference_point(_t([-5.0]).sum(), _t([-4.0]).sum(), _t(1.0)).item() == 0.0
    policy_kl = torch.tensor([-3.0, -2.0], requires_grad=True)
    z = kto_reference_point(policy_kl.sum(), _t([-4.0, -4.0], torch.float32).sum(), torch.tensor(2.0))
    assert z.item() == pytest.approx(1.5) and not z.requires_grad
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-1.0, -1.0]), torch.tensor([True, False]), z, 0.5)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises desirable, lowers undesirable log-probs


def write_color_kto(path, n, seed):
    """KTO records of the DPO tests' preference: colour replies desirable, animal replies undesirable."""
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            good = i % 2 == 0
            words = COLORS if good else ANIMALS
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
                                "completion": " " + " ".join(rng.choice(words) for _ in range(3)),
                                "label": good}) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "llama")


def test_step_matches_closed_form_on_transformers_logprobs(hf_dir, tmp_path):
    tokenizer = TextTokenizer.load(hf_dir)
    rows, _ = kto_rows(read_kto_records(write_color_kto(tmp_path / "kto.jsonl", 6, seed=1)), tokenizer, 64)
    # mismatched pairs: prompt i with completion i-1
    assert torch.equal(rows["kl_ids"][1, :rows["kl_len"][1]][rows["kl_mask"][1, :rows["kl_len"][1]]],
                       rows["seq_ids"][0, :rows["seq_len"][0]][rows["seq_mask"][0, :rows["seq_len"][0]]])
    model = build_finetune_model(load_hf_model(hf_dir), MethodSection(method="full"), 0)
    world = World(DistEnv(0, 0, 1), ParallelDims.resolve(1))
    rows = kto_reference(world, model, rows, 4, torch.device("cpu"), contextlib.nullcontext)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)  # the policy moves: mismatched pairs become likelier
    for _ in range(2):
        sgd.zero_grad()
        (-response_logprobs(model, rows["kl_ids"], rows["kl_mask"])[0].sum()).backward()
        sgd.step()
    hf_seq = hf_response_logprobs(hf_dir, rows["seq_ids"], rows["seq_mask"]).double().tolist()
    hf_kl = hf_response_logprobs(hf_dir, rows["kl_ids"], rows["kl_mask"]).double().tolist()
    torch.testing.assert_close(rows["ref_seq"].double(), torch.tensor(hf_seq, dtype=torch.float64), atol=1e-4,
                               rtol=1e-5)
    trainer = Trainer(model, build_optimizer(model, 1e-3, 0.0, (0.9, 0.95), 1e-8), KTOStep(), lambda s: 1e-3,
                      grad_clip=1.0)
    batches = kto_batches(rows, 4)  # two micro-batches of 4 and 2: one z_ref over both
    z = attach_reference_point(trainer, world, batches, over_dp=True)
    policy_seq, policy_kl = [], []
    with torch.no_grad():
        for side, out in (("seq", policy_seq), ("kl", policy_kl)):
            logits = model(rows[f"{side}_ids"])
            logp = torch.log_softmax(logits.double()[:, :-1], -1).gather(-1, rows[f"{side}_ids"][:, 1:, None])
            out.extend((logp.squeeze(-1) * rows[f"{side}_mask"][:, 1:]).sum(-1).tolist())
    expected_z = max(0.0, sum(p - r for p, r in zip(policy_kl, hf_kl)) / len(hf_kl))
    assert expected_z > 0.01 and z.item() == pytest.approx(expected_z, rel=1e-4)
    beta, lam_d, lam_u = 0.3, 2.0, 0.5
    step = KTOStep(beta, lam_d, lam_u)
    total = sum(step(model, b)[0].item() for b in batches)
    expected = 0.0
    for p, r, good in zip(policy_seq, hf_seq, rows["desirable"].tolist()):
        expected += lam_d * (1 - _sig(beta * (p - r - expected_z))) if good else \
            lam_u * (1 - _sig(beta * (expected_z - (p - r))))
    assert total == pytest.approx(expected, rel=1e-4)


def test_record_formats(hf_dir, tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "blue"}], "label": True},
        {"prompt": [{"role": "user", "content": "cat?"}], "completion": [{"role": "assistant", "content": "dog"}],
         "label": False},
        {"prompt": [{"role": "user", "content": "sea?"}], "completion": "green", "label": True}]) + "\n")
    records = read_kto_records(path)
    assert [r.desirable for r in records] == [True, False, True]
    assert records[0].prompt == [{"role": "user", "content": "sky?"}]
    assert records[2].completion == [{"role": "assistant", "content": "green"}]
    rows, _ = kto_rows(records, TextTokenizer.load(hf_dir), 64)
    tokenizer = TextTokenizer.load(hf_dir)
    scored = rows["seq_ids"][0][rows["seq_mask"][0]].tolist()
    assert tokenizer.decode(scored).startswith("blue")  # only the reply is scored


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "completion": " b"}, "kto.jsonl:2: missing 'label'; a KTO record needs \"label\": true"),
    ({"prompt": "a", "completion": " b", "label": 1}, "kto.jsonl:2: 'label' is 1; a KTO record needs"),
    ({"prompt": "a", "label": True}, "kto.jsonl:2: missing 'completion'"),
    ({"messages": [{"role": "assistant", "content": "b"}], "label": True}, "kto.jsonl:2: 'messages' must end"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}],
      "label": True}, "kto.jsonl:2: mixes chat messages and plain text with"),
])
def test_bad_records_name_their_line(tmp_path, record, message):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "x", "completion": " y", "label": True}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=None) as err:
        read_kto_records(path)
    assert message in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--align.method=kto", "--align.undesirable_weight=0"], "align.desirable_weight and align.undesirable_weight "
                                                              "must be > 0, got 1.0 and 0.0"),
    (["--align.method=online_dpo"], "align.reward (--reward) is required for online_dpo"),
    (["--align.method=online_dpo", "--align.reward=r.py:f", "--align.online_loss=simpo"],
     "align.online_loss must be dpo or ipo, got 'simpo'"),
    (["--align.method=online_dpo", "--align.reward=r.py:f", "--align.check_logprobs=true", "--train.dtype=bf16"],
     "align.check_logprobs compares fp32 log-probabilities"),
])
def test_bad_config_is_one_message_naming_the_key(flags, message):
    from cybertron.align.config import AlignConfig, validate
    from cybertron.config import parse_args
    from cybertron.errors import ConfigError

    cfg = parse_args(["--model.path=m", "--data.path=d.jsonl", *flags], AlignConfig())
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)

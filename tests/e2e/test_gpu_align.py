"""`cybertron align` on CUDA: bf16 DPO starts at ln 2 and learns; GRPO generates with the engine on the GPU and
its log-probabilities equal the trainer's in fp32; the fused loss equals the plain one on the GPU."""

import pytest
import torch

from tests.conftest import read_metrics
from tests.e2e.test_align_cli import _cli, write_arithmetic

pytest.importorskip("transformers")

from tests.unit.align.test_dpo import write_color_pairs  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402

COMMON = ["--log.progress", "lines", "--log.tensorboard", "false", "--log.every", "1"]


@pytest.mark.gpu
def test_dpo_bf16_on_cuda(tmp_path):
    hf = make_hf_dir(tmp_path / "hf")
    data = write_color_pairs(tmp_path / "prefs.jsonl", 40, seed=1)
    result = _cli(["align", "--model", str(hf), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "10",
                   "--lr", "2e-3", *COMMON])
    assert result.returncode == 0, result.stderr
    assert "on cuda" in result.stdout
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # bf16 reference and policy agree closely
    assert steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.gpu
def test_grpo_on_cuda_generator_equals_trainer(tmp_path):
    write_arithmetic(tmp_path)
    base = _cli(["train", "--data.path", str(tmp_path / "arith.jsonl"), "--data.cache_dir", str(tmp_path / "c"),
                 "--data.vocab_size", "300", "--data.seq_len", "64", "--model.preset", "debug", "--steps", "100",
                 "--out", str(tmp_path / "base"), "--eval.every", "0", *COMMON])
    assert base.returncode == 0, base.stderr
    result = _cli(["align", "--method", "grpo", "--model", str(tmp_path / "base"), "--data",
                   str(tmp_path / "prompts.jsonl"), "--reward", f"{tmp_path / 'reward.py'}:correct", "--weights",
                   "full", "--out", str(tmp_path / "grpo"), "--steps", "5", "--train.global_batch_size", "8",
                   "--align.group_size", "8", "--align.max_new_tokens", "3", "--data.val_fraction", "0",
                   "--train.dtype", "fp32", "--align.check_logprobs", "true", *COMMON])
    assert result.returncode == 0, result.stderr
    steps = [r for r in read_metrics(tmp_path / "grpo") if "loss" in r]
    assert len(steps) == 5 and max(r["logprob_gap"] for r in steps) < 1e-5


@pytest.mark.gpu
def test_fused_loss_on_cuda_matches_the_plain_path():
    from cybertron.train.fused_linear_ce import linear_cross_entropy_sum

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4096, 256, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(32000, 256, device="cuda", generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, 32000, (4096,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")
    plain.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=1024)
    fused.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-3)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=5e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad, expected[1], rtol=5e-2, atol=1e-3)

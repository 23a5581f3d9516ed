"""KTO and online DPO on 2 gloo ranks against the same run in one process. KTO's reference point z_ref is the mean
log-ratio of the mismatched pairs of the whole global batch (each rank forwards its share, the sums are
all-reduced), so the 2-rank losses, gradient norms and z_ref equal one process's; online DPO's ranks sample
exactly what one process samples for their prompts, from FSDP2-sharded weights under ZeRO-3."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics
from tests.distributed.test_align_distributed import ADAM_EPS, COMMON, LAYOUTS, _close, _steps
from tests.distributed.test_train_cli_distributed import _run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
pytest.importorskip("transformers")

from tests.e2e.test_align_cli import write_arithmetic  # noqa: E402
from tests.unit.align.test_kto import write_color_kto  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402


@pytest.mark.parametrize("weights, layout", [("lora", "zero3"), ("full", "ddp"), ("lora", "tp2")])
def test_kto_matches_one_process(tmp_path, weights, layout):
    hf, data = make_hf_dir(tmp_path / "hf"), write_color_kto(tmp_path / "kto.jsonl", 40, seed=3)
    flags, described = LAYOUTS[layout]
    args = ["align", "--method", "kto", "--model", str(hf), "--data", str(data), "--weights", weights,
            "--steps", "4", "--lr", "2e-3", "--train.global_batch_size", "8", "--train.micro_batch_size", "2",
            "--data.val_fraction", "0.2", "--eval.every", "2", *COMMON, *ADAM_EPS]
    _run([*args, "--out", str(tmp_path / "one")])
    two = _run([*args, *flags, "--out", str(tmp_path / "two")], torchrun=2)
    assert f"2 ranks ({described})" in two.stdout
    keys = ["loss", "grad_norm", "kl", "reward_signed"]
    one_steps = _steps(tmp_path / "one", keys)
    _close(_steps(tmp_path / "two", keys), one_steps, 1e-5)
    assert any(values[2] > 0 for values in one_steps.values())  # z_ref itself is compared, not only zeros
    val = lambda run: [r[k] for r in read_metrics(run) if "val_loss" in r for k in ("val_loss", "val_kl")]
    assert val(tmp_path / "two") == pytest.approx(val(tmp_path / "one"), abs=1e-5)


@pytest.mark.parametrize("weights", ["lora", "full"])  # full: the frozen reference is sharded too
def test_online_dpo_zero3_matches_one_process(tmp_path, weights):
    make_hf_dir(tmp_path / "hf")  # a random tiny model: completions vary, and so does a length reward
    write_arithmetic(tmp_path)
    (tmp_path / "length.py").write_text("def length(prompts, completions, **fields):\n"
                                        "    return [float(len(c)) for c in completions]\n")
    args = ["align", "--method", "online_dpo", "--model", str(tmp_path / "hf"), "--data",
            str(tmp_path / "prompts.jsonl"), "--reward", f"{tmp_path / 'length.py'}:length", "--steps", "3",
            "--train.global_batch_size", "4", "--align.max_new_tokens", "6", "--data.val_fraction", "0",
            "--lr", "1e-2", "--align.check_logprobs", "true", "--weights", weights, *COMMON]
    _run([*args, "--out", str(tmp_path / "one")])
    two = _run([*args, "--parallel.data_parallel", "zero3", "--out", str(tmp_path / "two")], torchrun=2)
    assert "2 ranks (zero3" in two.stdout
    keys = ["loss", "grad_norm", "reward", "reward_margin", "ties"]
    _close(_steps(tmp_path / "two", keys), _steps(tmp_path / "one", keys), 1e-5)
    rows = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert max(r["logprob_gap"] for r in rows) <= 1e-5 and any(r["grad_norm"] > 0 for r in rows)

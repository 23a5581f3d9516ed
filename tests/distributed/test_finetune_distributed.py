"""`cybertron finetune` on 2 gloo ranks (DDP, ZeRO-3) against the same run in one process: the same losses
and validation loss, and a 2-rank checkpoint that resumes in one process."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import read_metrics
from tests.distributed.test_train_cli_distributed import _run

pytestmark = pytest.mark.distributed
pytest.importorskip("transformers")

from tests.unit.finetune.tiny_hf import make_hf_dir, write_chats  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return make_hf_dir(root / "hf"), write_chats(root / "chats.jsonl", n=40)


def _records(run_dir):
    steps = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r}
    return steps, [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]


@pytest.mark.parametrize("method, layout", [("lora", "ddp"), ("qlora", "ddp"), ("qlora", "zero3"),
                                            ("full", "zero3")])
def test_finetune_on_two_ranks_matches_one_process(inputs, tmp_path, method, layout):
    hf, chats = inputs
    args = ["finetune", "--model", str(hf), "--data", str(chats), "--method", method, "--steps", "4",
            "--seq-len", "64", "--lr", "1e-3" if method == "full" else "5e-3", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "1", "--eval.every", "2", "--checkpoint.every", "2", "--data.val_fraction",
            "0.2", "--parallel.data_parallel", layout, "--train.dtype", "fp32", "--log.every", "1",
            "--log.progress", "lines", "--log.tensorboard", "false"]
    _run([*args, "--out", str(tmp_path / "one")])
    two = _run([*args, "--out", str(tmp_path / "two")], torchrun=2)
    assert f"2 ranks ({layout})" in two.stdout and two.stdout.count("done: step") == 1
    (steps1, val1), (steps2, val2) = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert sorted(steps2) == [1, 2, 3, 4]
    for step in steps1:
        assert steps2[step] == pytest.approx(steps1[step], rel=1e-5, abs=1e-6)
    assert val2 == pytest.approx(val1, abs=1e-5)
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-4")
    _run([*args, "--out", str(tmp_path / "two"), "--resume"])  # one process continues the 2-rank checkpoint
    assert _records(tmp_path / "two")[0][4] == pytest.approx(steps1[4], rel=1e-5, abs=1e-6)


def test_qlora_with_zero3_on_a_world_size_not_dividing_8_is_refused_before_any_process_starts(inputs, tmp_path,
                                                                                             capsys):
    from cybertron.cli import main as cli_main

    hf, chats = inputs
    assert cli_main(["finetune", "--model", str(hf), "--data", str(chats), "--method", "qlora", "--nproc", "3",
                     "--parallel.data_parallel", "zero3", "--train.global_batch_size", "6",
                     "--out", str(tmp_path / "x")]) == 2
    assert "needs a world size dividing 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

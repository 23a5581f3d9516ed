"""`cybertron finetune` under parallel layouts on gloo ranks (DDP, ZeRO-3, tensor parallelism with activation
checkpointing or CPU offload, FSDP x TP, pipeline stages) against the same run in one process: the same losses,
gradient norms and validation loss, and a checkpoint that one process resumes."""

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


def _args(hf, chats, method: str) -> list[str]:
    return ["finetune", "--model", str(hf), "--data", str(chats), "--method", method, "--steps", "4",
            "--seq-len", "64", "--lr", "1e-3" if method == "full" else "5e-3", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "1", "--eval.every", "2", "--checkpoint.every", "2", "--data.val_fraction",
            "0.2", "--train.dtype", "fp32", "--log.every", "1", "--log.progress", "lines",
            "--log.tensorboard", "false"]


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    """The single-process run of each method, made once (its layout flags change nothing on one process)."""
    hf, chats = inputs
    runs = {}

    def get(method: str):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"one-{method}")
            _run([*_args(hf, chats, method), "--out", str(out)])
            runs[method] = _records(out)
        return runs[method]
    return get


DP = "--parallel.data_parallel"
# (method, layout flags, ranks, description of the layout in the announcement)
DEFAULT_LAYOUTS = {
    "full-pp2": ("full", ["--parallel.pp", "2", "--train.micro_batch_size", "2"], 2, "ddp pp=2"),
}
SLOW_LAYOUTS = {
    # DoRA under tp=2 with activation checkpointing runs by default in test_adapters_parallel.py (the library path)
    "dora-tp2-checkpointed": ("dora", ["--parallel.tp", "2", "--parallel.activation_checkpoint", "full"], 2,
                              "ddp tp=2"),
    # QLoRA with the NF4 base sharded runs by default in test_qlora_zero3.py (the library path)
    "qlora-zero3": ("qlora", [DP, "zero3"], 2, "zero3 dp_shard=2"),
    "lora-ddp": ("lora", [DP, "ddp"], 2, "ddp dp_replicate=2"),
    "qlora-ddp": ("qlora", [DP, "ddp"], 2, "ddp dp_replicate=2"),
    "full-zero3": ("full", [DP, "zero3"], 2, "zero3 dp_shard=2"),
    "full-tp2": ("full", ["--parallel.tp", "2"], 2, "ddp tp=2"),
    "lora-tp2-offload": ("lora", [DP, "zero3", "--parallel.tp", "2", "--parallel.cpu_offload", "true"], 2,
                         "zero3 tp=2"),
    "lora-zero3-tp2x2": ("lora", [DP, "zero3", "--parallel.tp", "2"], 4, "zero3 dp_shard=2 x tp=2"),
    "dora-pp2": ("dora", ["--parallel.pp", "2", "--train.micro_batch_size", "2"], 2, "ddp pp=2"),
    # context parallelism: each rank holds half of every (packed) chat sequence
    "full-cp2": ("full", ["--parallel.cp", "2"], 2, "ddp cp=2"),
    "lora-cp2": ("lora", ["--parallel.cp", "2"], 2, "ddp cp=2"),
}


def _check_layout(inputs, one_process, tmp_path, method, flags, ranks, described):
    hf, chats = inputs
    args = [*_args(hf, chats, method), *flags]
    two = _run([*args, "--out", str(tmp_path / "two")], torchrun=ranks)
    assert f"{ranks} ranks ({described})" in two.stdout and two.stdout.count("done: step") == 1
    (steps1, val1), (steps2, val2) = one_process(method), _records(tmp_path / "two")
    assert sorted(steps2) == [1, 2, 3, 4]
    for step in steps1:  # loss and gradient norm
        assert steps2[step] == pytest.approx(steps1[step], rel=1e-5, abs=1e-6)
    assert val2 == pytest.approx(val1, abs=1e-5)
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-4")
    # one process continues the checkpoint of the layout (checkpoints do not depend on it)
    _run([*_args(hf, chats, method), "--out", str(tmp_path / "two"), "--resume"])
    assert _records(tmp_path / "two")[0][4] == pytest.approx(steps1[4], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(DEFAULT_LAYOUTS))
def test_finetune_layouts_match_one_process(inputs, one_process, tmp_path, name):
    _check_layout(inputs, one_process, tmp_path, *DEFAULT_LAYOUTS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_LAYOUTS))
def test_more_finetune_layouts_match_one_process(inputs, one_process, tmp_path, name):
    _check_layout(inputs, one_process, tmp_path, *SLOW_LAYOUTS[name])


def test_qlora_with_zero3_on_a_world_size_not_dividing_8_is_refused_before_any_process_starts(inputs, tmp_path,
                                                                                             capsys):
    from cybertron.cli import main as cli_main

    hf, chats = inputs
    assert cli_main(["finetune", "--model", str(hf), "--data", str(chats), "--method", "qlora", "--nproc", "3",
                     "--parallel.data_parallel", "zero3", "--train.global_batch_size", "6",
                     "--out", str(tmp_path / "x")]) == 2
    assert "needs a shard count dividing 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

"""Full, LoRA and DoRA fine-tuning through `parallelize()` under tensor parallelism (with and without sequence
and loss parallelism), FSDP x TP, activation checkpointing and CPU offload: the same losses and gradient norms
as one process (fp32, gloo), and the frozen base weights never move."""

from __future__ import annotations

import functools

import pytest

from tests.distributed.adapter_harness import METHODS, AdapterRun, reference_run, run_world

pytestmark = pytest.mark.distributed
TOL = 1e-5

TP2 = {"tp": 2}
PLAIN_TP = {**TP2, "sequence_parallel": False, "loss_parallel": False}
# The default run: adapters under TP with sequence and loss parallelism (the norms' frozen weights re-registered
# by SequenceParallel) and DoRA with activation checkpointing; CPU offload (FSDP2 over the tp mesh's one-rank
# data-parallel dim) and the rest run with -m slow.
WORLD_2 = {
    "lora_tp": AdapterRun("lora", TP2),
    "dora_tp_ac": AdapterRun("dora", {**TP2, "activation_checkpoint": "full"}),
}
WORLD_2_SLOW = {
    "dora_tp": AdapterRun("dora", TP2),
    "lora_tp_offload": AdapterRun("lora", {**TP2, "cpu_offload": True}),  # the finetune CLI's slow run has it
    **{f"{m}_tp_plain": AdapterRun(m, PLAIN_TP) for m in METHODS},
    "full_tp": AdapterRun("full", TP2),
    "full_tp_ac": AdapterRun("full", {**TP2, "activation_checkpoint": "full"}),
    "lora_tp_ac": AdapterRun("lora", {**TP2, "activation_checkpoint": "selective"}),
    "full_tp_offload": AdapterRun("full", {**TP2, "cpu_offload": True}),
    "dora_tp_offload": AdapterRun("dora", {**TP2, "cpu_offload": True}),
    **{f"{m}_zero3_offload": AdapterRun(m, {"cpu_offload": True}) for m in METHODS},
}
# Fine-tuning with train.fused_loss (a frozen head under LoRA): FSDP2, and TP with and without loss parallelism.
WORLD_2_FUSED = {
    "lora_zero3_fused": AdapterRun("lora", {}, fused_loss=True),
    "full_zero3_fused": AdapterRun("full", {}, fused_loss=True),
    "lora_tp_fused": AdapterRun("lora", TP2, fused_loss=True),
    "full_tp_plain_fused": AdapterRun("full", PLAIN_TP, fused_loss=True),
}
WORLD_4 = {f"{m}_fsdp_tp": AdapterRun(m, {"dp_shard": 2, **TP2}) for m in METHODS}


@pytest.fixture(scope="module")
def references() -> dict:
    return {m: reference_run(m) for m in METHODS}


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict:
    return run_world(2, WORLD_2, tmp_path_factory.mktemp("adapters2"), port=29632)


@pytest.fixture(scope="module")
def world2_slow(tmp_path_factory) -> dict:
    return run_world(2, WORLD_2_SLOW, tmp_path_factory.mktemp("adapters2slow"), port=29633)


@pytest.fixture(scope="module")
def world2_fused(tmp_path_factory) -> dict:
    return run_world(2, WORLD_2_FUSED, tmp_path_factory.mktemp("adapters2fused"), port=29635)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> dict:
    return run_world(4, WORLD_4, tmp_path_factory.mktemp("adapters4"), port=29634)


def _assert_matches(result: dict, reference: dict) -> None:
    assert "error" not in result, result.get("trace")
    dloss = max(abs(a - b) for a, b in zip(result["losses"], reference["losses"]))
    # relative for the norm: a full fine-tune's norm grows past 1, where fp32 summation order shows at 1e-5
    dnorm = max(abs(a - b) / b for a, b in zip(result["grad_norms"], reference["grad_norms"]))
    assert len(result["losses"]) == len(reference["losses"])
    assert dloss <= TOL and dnorm <= TOL, (dloss, dnorm, result, reference)
    assert result["frozen_moved"] == 0.0  # frozen base weights (LoRA/DoRA) stayed bit-identical
    assert result["trainable_dtensors"] > 0  # the layout did shard the trained parameters


def test_reference_trains_something(references):
    for method, ref in references.items():
        assert ref["trained_moved"] > 1e-3, method  # the steps move the trained weights (random tokens:
        assert min(ref["grad_norms"]) > 0, method  # the loss itself need not fall)
        assert (ref["n_frozen"] > 0) == (method != "full")


@pytest.mark.parametrize("name", sorted(WORLD_2))
def test_adapters_match_one_process_at_world_2(name, world2, references):
    _assert_matches(world2[name], references[WORLD_2[name].method])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORLD_2_SLOW))
def test_more_adapter_layouts_match_one_process_at_world_2(name, world2_slow, references):
    _assert_matches(world2_slow[name], references[WORLD_2_SLOW[name].method])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORLD_4))
def test_adapters_match_one_process_with_fsdp_x_tp(name, world4, references):
    _assert_matches(world4[name], references[WORLD_4[name].method])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORLD_2_FUSED))
def test_fine_tuning_with_the_fused_loss_matches_one_process(name, world2_fused):
    run = WORLD_2_FUSED[name]
    _assert_matches(world2_fused[name], _fused_reference(run.method))


@functools.cache
def _fused_reference(method: str) -> dict:
    return reference_run(method, fused_loss=True)

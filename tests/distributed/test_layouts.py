"""Every parallel layout trains STEPS steps from the single-process run's initial weights and matches its
losses within 1e-5 (fp32, gloo, CPU), with gradient accumulation and clipping on; checkpoints saved by one
layout resume on another (and in one process) with the same next-step loss and the same next batch."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import Layout, reference_run, run_world
from tests.distributed.layouts import (
    SAVE_AT,
    WORLD_2,
    WORLD_2_NEW_TORCH,
    WORLD_2_SLOW,
    WORLD_4,
    WORLD_4_SLOW,
    WORLD_8,
)

pytestmark = pytest.mark.distributed
TOL = 1e-5
NEW_TORCH = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12)


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run(Layout(record_batch=True))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def world4(ckpt_dir) -> dict:
    return run_world(4, WORLD_4, ckpt_dir / "w4", port=29614)


@pytest.fixture(scope="module")
def world4_slow(ckpt_dir) -> dict:
    return run_world(4, WORLD_4_SLOW, ckpt_dir / "w4slow", port=29616)


@pytest.fixture(scope="module")
def world2(ckpt_dir, world4) -> dict:  # after world4: it resumes world4's checkpoints
    layouts = {**WORLD_2, **(WORLD_2_NEW_TORCH if NEW_TORCH else {})}
    return run_world(2, layouts, ckpt_dir / "w4", port=29612)


@pytest.fixture(scope="module")
def world2_slow(ckpt_dir, world4) -> dict:  # after world4: it resumes world4's checkpoints
    return run_world(2, WORLD_2_SLOW, ckpt_dir / "w4", port=29620)


def _assert_matches(result: dict, reference: dict) -> None:
    assert "error" not in result, result.get("trace")
    assert len(result["losses"]) == len(reference["losses"])
    dloss = max(abs(a - b) for a, b in zip(result["losses"], reference["losses"]))
    assert dloss <= TOL, (result["losses"], reference["losses"])
    # clipping is active (norm above grad_clip=0.5) and the norm is the true global one
    assert max(abs(a - b) for a, b in zip(result["grad_norms"], reference["grad_norms"])) < 1e-3
    assert abs(result["val_loss"] - reference["val_loss"]) <= TOL


@pytest.mark.parametrize("name", sorted(WORLD_4))
def test_layout_matches_single_process_at_world_4(name, world4, reference):
    assert min(reference["grad_norms"]) > 0.5  # clipping engaged in every step
    _assert_matches(world4[name], reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORLD_4_SLOW))
def test_more_layouts_match_single_process_at_world_4(name, world4_slow, reference):
    _assert_matches(world4_slow[name], reference)


@pytest.mark.parametrize("name", sorted(n for n in WORLD_2 if not n.startswith("resume")))
def test_layout_matches_single_process_at_world_2(name, world2, reference):
    _assert_matches(world2[name], reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in WORLD_2_SLOW if not n.startswith("resume")))
def test_more_layouts_match_single_process_at_world_2(name, world2_slow, reference):
    _assert_matches(world2_slow[name], reference)


@pytest.mark.skipif(not NEW_TORCH, reason="ZBV / DualPipeV fail with gloo on torch < 2.12")
@pytest.mark.parametrize("name", sorted(WORLD_2_NEW_TORCH))
def test_v_schedules_match_single_process(name, world2, reference):
    _assert_matches(world2[name], reference)


def _assert_resumed(result: dict, reference: dict) -> None:
    assert "error" not in result, result.get("trace")
    assert result["losses"] == pytest.approx([reference["losses"][SAVE_AT]], abs=TOL)
    assert result["batches"][0] == reference["batches"][SAVE_AT]  # same next global batch of tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in WORLD_2_SLOW if n.startswith("resume")))
def test_checkpoint_resumes_on_yet_another_layout(name, world2_slow, reference):
    _assert_resumed(world2_slow[name], reference)


@pytest.mark.parametrize("name", sorted(n for n in WORLD_2 if n.startswith("resume")))
def test_checkpoint_resumes_on_another_layout(name, world2, reference):
    _assert_resumed(world2[name], reference)


@pytest.mark.parametrize("saved_by", ["zero3", "pp_fsdp", "zero1", "zero2"])
def test_checkpoint_resumes_in_one_process(saved_by, world4, ckpt_dir, reference):
    assert "error" not in world4[saved_by], world4[saved_by].get("trace")
    result = reference_run(Layout(resume_from=saved_by, record_batch=True), out_dir=ckpt_dir / "w4")
    _assert_resumed(result, reference)


@pytest.fixture(scope="module")
def world8(ckpt_dir) -> dict:
    return run_world(8, WORLD_8, ckpt_dir / "w8", port=29618)


@pytest.mark.slow  # 8 ranks on 2 cores: over a minute; the same dimensions compose at world size 4 by default
@pytest.mark.parametrize("name", sorted(WORLD_8))
def test_pp_tp_dp_matches_single_process_at_world_8(name, world8, reference):
    _assert_matches(world8[name], reference)

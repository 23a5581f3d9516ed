"""Expert parallelism on a mixture-of-experts model: each layout trains STEPS steps from the single-process
run's initial weights and matches its losses within 1e-5 and its gradient norms (fp32, gloo, CPU), composed
with FSDP2 over the data-parallel ranks EP does not use, with tensor parallelism (experts replicated over
tp) and with pipeline stages; a checkpoint saved at ep 4 resumes at ep 2 and in one process with the same
next-step loss and the same next batch (DCP reshards the experts' Shard(0) DTensors).

Only ep 2 on 2 ranks runs by default (a 4-rank world takes a minute on 2 cores); the rest with -m slow."""

from __future__ import annotations

import pytest

from tests.distributed.harness import Layout, reference_run, run_world
from tests.distributed.layouts import SAVE_AT
from tests.distributed.test_layouts import TOL, _assert_matches, _assert_resumed

pytestmark = pytest.mark.distributed

WORLD_2 = {"ep2": Layout({"ep": 2}, moe=True)}  # dp_shard 2 = efsdp 1 x ep 2
WORLD_4 = {
    # dp_shard 4 = efsdp 2 x ep 2: each expert FSDP-sharded over the 2 ranks outside its expert-parallel group
    "ep2_dp_shard4": Layout({"ep": 2}, moe=True),
    "ep2_tp2": Layout({"ep": 2, "tp": 2}, moe=True),
    "ep2_pp2": Layout({"ep": 2, "pp": 2, "pp_schedule": "1f1b"}, micro_batch=4, moe=True),
    "ep2_hsdp": Layout({"ep": 2, "dp_replicate": 2, "dp_shard": 2}, moe=True),
    "ep4": Layout({"ep": 4}, moe=True, save_at=SAVE_AT),
}
WORLD_2_AFTER_4 = {  # resumes world 4's checkpoint
    "resume_ep4_as_ep2": Layout({"ep": 2}, moe=True, resume_from="ep4", record_batch=True),
    "moe_tp2_no_ep": Layout({"tp": 2}, moe=True),
    "ep2_ac_full": Layout({"ep": 2, "activation_checkpoint": "full"}, moe=True),  # recompute repeats dispatch
}


def _assert_ep_matches(result: dict, reference: dict) -> None:
    """The layouts' checks, and the gradient norm (which clipping uses) to 1e-5 as well: a wrongly scaled
    expert gradient (summed over the ep group, then averaged over efsdp only) would move it long before the
    loss."""
    _assert_matches(result, reference)
    assert max(abs(a - b) for a, b in zip(result["grad_norms"], reference["grad_norms"])) <= TOL


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run(Layout(moe=True, record_batch=True))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("expert_parallel")


@pytest.fixture(scope="module")
def world2(ckpt_dir) -> dict:
    return run_world(2, WORLD_2, ckpt_dir / "w2", port=29673)


@pytest.fixture(scope="module")
def world4(ckpt_dir) -> dict:
    return run_world(4, WORLD_4, ckpt_dir / "w4", port=29675)


@pytest.fixture(scope="module")
def world2_after_4(ckpt_dir, world4) -> dict:
    return run_world(2, WORLD_2_AFTER_4, ckpt_dir / "w4", port=29677)


def test_ep2_matches_single_process(world2, reference):
    assert min(reference["grad_norms"]) > 0.5  # clipping engaged in every step
    _assert_ep_matches(world2["ep2"], reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORLD_4))
def test_ep_layout_matches_single_process_at_world_4(name, world4, reference):
    _assert_ep_matches(world4[name], reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe_tp2_no_ep", "ep2_ac_full"])
def test_more_moe_layouts_match_single_process_at_world_2(name, world2_after_4, reference):
    _assert_ep_matches(world2_after_4[name], reference)


@pytest.mark.slow
def test_ep4_checkpoint_resumes_at_ep2(world2_after_4, reference):
    _assert_resumed(world2_after_4["resume_ep4_as_ep2"], reference)


@pytest.mark.slow
def test_ep4_checkpoint_resumes_in_one_process(world4, ckpt_dir, reference):
    assert "error" not in world4["ep4"], world4["ep4"].get("trace")
    result = reference_run(Layout(moe=True, resume_from="ep4", record_batch=True), out_dir=ckpt_dir / "w4")
    _assert_resumed(result, reference)

"""QLoRA under ZeRO-3 on 2 gloo ranks: FSDP2 shards the NF4 base (each rank keeps half of its bytes) and the
steps match one process on loss and gradient norm."""

from __future__ import annotations

import pytest

from tests.distributed.adapter_harness import AdapterRun, reference_run, run_world

pytestmark = pytest.mark.distributed
pytest.importorskip("torchao")
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    world = run_world(2, {"qlora_zero3": AdapterRun("qlora", {"data_parallel": "zero3"})},
                      tmp_path_factory.mktemp("qlora_zero3"), port=29641)
    return world["qlora_zero3"], reference_run("qlora")


def test_qlora_zero3_matches_one_process(runs):
    result, reference = runs
    assert "error" not in result, result.get("trace")
    assert len(result["losses"]) == len(reference["losses"]) > 0
    for got, want in zip(result["losses"], reference["losses"]):
        assert got == pytest.approx(want, abs=TOL)
    for got, want in zip(result["grad_norms"], reference["grad_norms"]):
        assert got == pytest.approx(want, rel=TOL)
    assert reference["trained_moved"] > 1e-3  # the adapters did train
    assert result["frozen_moved"] == 0.0  # the NF4 codes stayed bit-identical on every rank


def test_each_rank_holds_half_of_the_nf4_base(runs):
    result, reference = runs
    (whole, table), (local, local_table) = reference["nf4_bytes"], result["nf4_bytes"]
    assert whole > 0 and local_table == table
    # the codes, scales and scale factors are split in two; each rank keeps the code table and scale mean whole
    assert local - table == (whole - table) // 2, (local, whole, table)
    assert local <= 0.53 * whole

"""Context parallelism (each cp rank holds the zigzag chunks i and 2cp-1-i of every sequence, attention over
all-gathered K/V) trains STEPS steps with the single process's losses, gradient norms and validation loss
within 1e-5 (fp32, gloo), on plain rows and on rows packed with documents, alone and composed with FSDP2,
DDP and tensor parallelism."""

from __future__ import annotations

import pytest

from tests.distributed.harness import Layout, reference_run, run_world
from tests.distributed.layouts import CP_WORLD_2, CP_WORLD_2_SLOW, CP_WORLD_4

pytestmark = pytest.mark.distributed
TOL = 1e-5


@pytest.fixture(scope="module")
def references() -> dict[bool, dict]:
    """The single-process run, keyed by whether rows are packed documents."""
    return {}


def _reference(references: dict, documents: bool) -> dict:
    if documents not in references:
        references[documents] = reference_run(Layout(documents=documents))
    return references[documents]


def _assert_matches(result: dict, reference: dict) -> None:
    assert "error" not in result, result.get("trace")
    assert result["losses"] == pytest.approx(reference["losses"], abs=TOL)
    assert min(reference["grad_norms"]) > 0.5  # clipping engaged: the norm must be the true global one
    assert result["grad_norms"] == pytest.approx(reference["grad_norms"], abs=TOL)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], abs=TOL)


def test_cp2_with_packed_documents_matches_single_process(tmp_path, references):
    results = run_world(2, CP_WORLD_2, tmp_path, port=29652)
    for name, layout in CP_WORLD_2.items():
        _assert_matches(results[name], _reference(references, layout.documents))


@pytest.mark.slow
def test_more_cp_layouts_match_single_process_at_world_2(tmp_path, references):
    results = run_world(2, CP_WORLD_2_SLOW, tmp_path, port=29654)
    for name, layout in CP_WORLD_2_SLOW.items():
        _assert_matches(results[name], _reference(references, layout.documents))


@pytest.mark.slow  # 4 ranks on 2 cores
def test_cp4_and_cp_with_fsdp_and_tp_match_single_process(tmp_path, references):
    results = run_world(4, CP_WORLD_4, tmp_path, port=29656)
    for name, layout in CP_WORLD_4.items():
        _assert_matches(results[name], _reference(references, layout.documents))

"""`cybertron plan`: the memory model's closed-form properties, the layouts it admits (cybertron's own
validators), and the CLI. The model against measured peaks: tests/distributed/test_plan_memory.py (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from cybertron.cli import main as cli_main
from cybertron.models.presets import preset_config
from cybertron.parallel.dims import ParallelDims
from cybertron.plan.layouts import Layout, candidate_layouts
from cybertron.plan.memory import Shapes, estimate
from cybertron.plan.planner import plan
from cybertron.plan.report import parse_bytes
from tests.conftest import cli_env

LLAMA = preset_config("llama3-8b")
GIB = 2**30


def layout(world: int, ac: str = "none", micro_batch: int = 1, **kw) -> Layout:
    return Layout(ParallelDims.resolve(world, **kw), ac, micro_batch, 2 * kw.get("pp", 1) if kw.get("pp", 1) > 1 else 1)


def test_zero3_divides_params_grads_and_optimizer_state_by_dp_shard_exactly():
    one = estimate(LLAMA, layout(1), 4096)
    assert one.params == 4 * LLAMA.num_params()  # fp32 master weights, whatever the compute dtype
    assert one.optim == 8 * LLAMA.num_params()
    for n in (2, 8, 64):
        sharded = estimate(LLAMA, layout(n, data_parallel="zero3"), 4096)
        for term in ("params", "grads", "optim"):
            assert getattr(sharded, term) == pytest.approx(getattr(one, term) / n, rel=1e-12)
        assert sharded.activations == one.activations  # data parallelism does not split a rank's tokens


def test_ddp_replicates_and_zero1_zero2_partition_as_the_paper_says():
    n, ddp = 8, estimate(LLAMA, layout(8, data_parallel="ddp"), 4096)
    z1 = estimate(LLAMA, layout(8, data_parallel="zero1"), 4096)
    z2 = estimate(LLAMA, layout(8, data_parallel="zero2"), 4096)
    p = LLAMA.num_params()
    assert (ddp.params + ddp.grads + ddp.optim) / p == 16
    assert (z1.params + z1.grads + z1.optim) / p == pytest.approx(4 + 4 + 8 / n)
    assert (z2.params + z2.grads + z2.optim) / p == pytest.approx(4 + 12 / n)


def test_tp_splits_attention_mlp_embedding_and_head_but_not_norms():
    s = Shapes.of(LLAMA)
    norms = LLAMA.n_layers * s.norms + LLAMA.dim
    assert s.attn * LLAMA.n_layers + s.dense_mlp * LLAMA.n_layers + s.embed + s.head + norms == LLAMA.num_params()
    tp2 = estimate(LLAMA, layout(2, tp=2), 4096)
    assert tp2.params == pytest.approx(4 * ((LLAMA.num_params() - norms) / 2 + norms))
    # activations shrink too, but not by 2: the norms' gathered outputs stay whole under sequence parallelism
    one = estimate(LLAMA, layout(1), 4096)
    assert one.activations / 2 < tp2.activations < one.activations


def test_activation_checkpointing_and_pipeline_reduce_activations():
    one, ac = estimate(LLAMA, layout(1), 4096), estimate(LLAMA, layout(1, "full"), 4096)
    assert ac.activations < one.activations / 5
    pp = estimate(LLAMA, layout(2, pp=2, data_parallel="zero3"), 4096)
    assert pp.params == pytest.approx(one.params / 2, rel=0.05)  # the stage with the embedding (or the head)


def test_layouts_are_only_those_cybertron_runs():
    qwen = preset_config("qwen2-0.5b")  # 14 heads, 2 kv heads, tied embeddings
    layouts = candidate_layouts(qwen, 8, 4096, [1])
    assert {lay.dims.tp for lay in layouts} == {1, 2}  # tp 4 and 8 do not divide the 2 kv heads
    assert all(lay.dims.pp == 1 for lay in layouts)  # tied embeddings refuse pipeline stages
    assert all(lay.dims.ep == 1 for lay in layouts)  # dense model
    window = replace(LLAMA, sliding_window=1024)
    assert all(lay.dims.cp == 1 for lay in candidate_layouts(window, 8, 4096, [1]))
    moe = preset_config("moe")
    ep = [lay for lay in candidate_layouts(moe, 4, 1024, [1]) if lay.dims.ep > 1]
    assert ep and all(lay.dims.dp_shard % lay.dims.ep == 0 and lay.dims.cp == 1 for lay in ep)
    assert all(lay.dims.data_parallel in ("zero2", "zero3") for lay in ep)
    assert not any(lay.dims.data_parallel in ("ddp", "zero1") and lay.dims.tp > 1
                   for lay in candidate_layouts(LLAMA, 8, 4096, [1]))


def test_plan_orders_fitting_layouts_first_and_marks_the_rest():
    rows = plan(LLAMA, 8, 8192, 80 * GIB, [1, 2])
    fits = [r for r in rows if r.fits]
    assert fits and fits == rows[: len(fits)]
    assert all(r.memory.total <= 80 * GIB for r in fits)
    assert all(r.memory.total > 80 * GIB for r in rows[len(fits):])
    assert fits[0].relative_time == 1.0 and all(r.relative_time >= 1.0 for r in fits)
    assert not any(r.layout.zero == "ddp" for r in fits)  # 16 bytes per parameter of 8B is 120 GiB


def test_cli_prints_fitting_layouts_and_json(capsys):
    argv = ["plan", "--model", "llama3-8b", "--gpu-memory", "80GiB", "--world-size", "8", "--seq-len", "8192"]
    assert cli_main(argv + ["--top", "0"]) == 0
    table = capsys.readouterr().out
    assert "fsdp8" in table and " ddp8 " not in table
    assert cli_main(argv + ["--json", "--all", "--top", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["fits"] for r in rows} == {True, False}
    assert any(r["layout"] == "ddp8" and not r["fits"] for r in rows)
    assert all(r["memory_bytes"]["total"] <= 80 * GIB for r in rows if r["fits"])


def test_parse_bytes_and_bad_memory_string(capsys):
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("141GB") == 141e9 and parse_bytes("1.5 tib") == 1.5 * 2**40
    assert cli_main(["plan", "--model", "llama3-8b", "--gpu-memory", "eighty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpu-memory 'eighty'")


def test_cli_unknown_preset_is_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "cybertron", "plan", "--model", "llama9-1t", "--gpu-memory",
                             "80GiB"], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model 'llama9-1t'"), result.stderr

"""Bad layouts fail in `validate`, before any process group or model exists, naming the constraint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cybertron.config import TrainConfig, parse_args
from cybertron.errors import ConfigError
from cybertron.pretrain import validate
from tests.conftest import cli_env

BASE = ["--model.preset", "debug", "--data.vocab_size", "256", "--train.global_batch_size", "16"]

BAD = {
    "product is not the world size": (4, ["--parallel.dp_shard", "3", "--parallel.tp", "2"],
                                      "must equal the world size 4"),
    "rest does not divide": (4, ["--parallel.tp", "3"], "not divisible by parallel.dp_replicate x tp x pp"),
    "tp does not divide kv heads": (4, ["--parallel.tp", "4"], "model.n_kv_heads=2"),
    "tp does not divide ffn": (2, ["--parallel.tp", "2", "--model.ffn_dim", "129", "--model.n_kv_heads", "4"],
                               "model.ffn_dim=129"),
    "pp larger than layers": (8, ["--parallel.pp", "8", "--model.n_layers", "4"], "larger than the number of layers"),
    "fewer micro-batches than stages": (2, ["--parallel.pp", "2", "--parallel.pp_microbatches", "1"],
                                        "fewer than the 2 pipeline stages"),
    "global batch not divisible by dp": (4, ["--train.global_batch_size", "6"], "not divisible by the data-parallel"),
    "micro-batch does not divide the rank's batch": (2, ["--train.micro_batch_size", "4", "--train.global_batch_size",
                                                         "12"], "must divide the per-rank batch 6"),
    "unknown data parallel": (2, ["--parallel.data_parallel", "zero4"], "parallel.data_parallel must be one of"),
    "ddp with tp": (4, ["--parallel.data_parallel", "ddp", "--parallel.tp", "2"], "does not compose with tp/pp"),
    "ddp with tp over cp ranks": (4, ["--parallel.data_parallel", "ddp", "--parallel.tp", "2", "--parallel.cp", "2"],
                                  "does not compose with tp/pp"),
    "single-stage schedule with virtual stages": (2, ["--parallel.pp", "2", "--parallel.pp_virtual_stages", "2",
                                                      "--parallel.pp_schedule", "gpipe"], "one stage per rank"),
    "unknown schedule": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "chimera"], "pp_schedule must be one of"),
    "activation checkpointing mode": (1, ["--parallel.activation_checkpoint", "some"], "activation_checkpoint"),
    "zero-bubble with fsdp": (4, ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_zb",
                                  "--parallel.pp_virtual_stages", "2", "--parallel.pp_microbatches", "4"],
                              "FSDP and tensor parallelism"),
    "sequence parallel with an odd sequence": (2, ["--parallel.tp", "2", "--data.seq_len", "63"],
                                               "must divide data.seq_len=63"),
    "fused loss with pipeline stages": (2, ["--parallel.pp", "2", "--train.fused_loss", "true"],
                                        "train.fused_loss does not run with pipeline parallelism"),
    "tied embeddings with pp": (2, ["--parallel.pp", "2", "--model.tie_embeddings", "true"], "tie_embeddings=false"),
    "ep on a dense model": (2, ["--parallel.ep", "2"], "parallel.ep=2 needs a mixture-of-experts model"),
    "ep larger than dp_shard": (4, ["--parallel.ep", "4", "--parallel.tp", "2"], "parallel.ep=4 must divide "
                                                                               "parallel.dp_shard=2"),
    "ep with ddp": (2, ["--parallel.ep", "2", "--parallel.data_parallel", "ddp"], "parallel.ep=2 needs "
                                                                                  "parallel.data_parallel zero2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layout_is_rejected_naming_the_constraint(case):
    world, args, fragment = BAD[case]
    cfg = parse_args([*BASE, *args], TrainConfig())
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize("world, args", [
    (4, ["--parallel.dp_shard", "2", "--parallel.tp", "2"]),
    (4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"]),
    (4, ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.pp_schedule", "interleaved_1f1b",
         "--parallel.pp_virtual_stages", "2", "--parallel.pp_microbatches", "4"]),
    (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_zb", "--parallel.pp_virtual_stages", "2",
         "--parallel.pp_microbatches", "4"]),
    (1, []),
])
def test_good_layouts_validate(world, args):
    validate(parse_args([*BASE, *args], TrainConfig()), world)


def test_cli_reports_a_bad_layout_in_one_line_before_launching(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cybertron", "train", "--nproc", "4", *BASE,
                             "--parallel.tp", "3", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "world size 4" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()

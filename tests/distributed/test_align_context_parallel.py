"""`cybertron align` under context parallelism (each cp rank holds 2 of the 2 x cp zigzag chunks of every
preference sequence; per-sequence log-probabilities and reward scores are summed over the cp group) against
the same run in one process: losses, gradient norms, rewards and held-out losses within 1e-5 in fp32 (gloo),
the reference log-probabilities of DPO computed under cp too. The ranks run the command's `run` in spawned
processes (no torchrun); the single process runs in pytest's. Default: DPO with LoRA at cp 2; the other
methods, full weights, FSDP2 (dp_shard 2 x cp 2) and tensor parallelism (cp 2 x tp 2) with `-m slow`."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import read_metrics

pytestmark = pytest.mark.distributed
pytest.importorskip("transformers")

from tests.unit.align.test_dpo import write_color_pairs  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402

TOL = 1e-5
# Adam's first step divides by near-zero moments for tiny gradients: a larger eps keeps the comparison about
# the layout, not about fp32 summation noise amplified there (as test_align_distributed.py).
COMMON = ["--log.progress", "lines", "--log.tensorboard", "false", "--log.every", "1", "--train.dtype", "fp32",
          "--train.eps", "1e-6", "--steps", "3", "--lr", "2e-3", "--train.global_batch_size", "4",
          "--train.micro_batch_size", "2", "--data.val_fraction", "0.25", "--eval.every", "3",
          "--eval.batches", "1", "--eval.batch_size", "4", "--checkpoint.every", "0", "--data.seq_len", "32"]


def _config(args: list[str]):
    from cybertron.align.config import SHORTCUTS, AlignConfig
    from cybertron.config import parse_args

    return parse_args(args, AlignConfig(), SHORTCUTS)


def _worker(rank: int, world_size: int, port: int, args: list[str]) -> None:
    """mp.start_processes entry: one rank of the run, as torchrun would start it."""
    from cybertron.commands.align import run
    from cybertron.parallel.runtime import DistEnv

    torch.set_num_threads(1)  # 2 cores shared by all ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(_config(args), DistEnv(rank, rank, world_size))


def _run(args: list[str], out, world_size: int = 1, port: int = 0) -> list[dict]:
    args = [*args, "--out", str(out)]
    if world_size == 1:
        from cybertron.commands.align import run

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same kernels' summation order as the ranks
        try:
            run(_config(args))
        finally:
            torch.set_num_threads(threads)
    else:
        # fork: the ranks start with pytest's modules already imported (spawning re-imports torch and
        # cybertron in each, most of this test's time); no process group exists here to be inherited.
        # (A process group of an earlier in-process test would be inherited: spawn then.)
        mp.start_processes(_worker, args=(world_size, port, args), nprocs=world_size, join=True,
                           start_method="spawn" if dist.is_initialized() else "fork")
    return read_metrics(out)


def _close(got: list[dict], expected: list[dict], keys: list[str]) -> None:
    def table(rows):
        return [[r[k] for k in keys] for r in rows if "loss" in r]
    assert len(table(got)) == len(table(expected)) == 3
    for a, b in zip(table(got), table(expected)):
        assert a == pytest.approx(b, abs=TOL), (a, b)
    val = lambda rows: [r["val_loss"] for r in rows if "val_loss" in r]
    assert val(got) and val(got) == pytest.approx(val(expected), abs=TOL)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    return make_hf_dir(root / "hf"), write_color_pairs(root / "prefs.jsonl", 20, seed=3)


CASES = {  # name -> (world size, layout flags)
    "cp2": (2, ["--parallel.cp", "2"]),
    "dp_shard2xcp2": (4, ["--parallel.cp", "2", "--parallel.data_parallel", "zero3", "--parallel.dp_shard", "2"]),
    # DDP (align's default) does not compose with tensor parallelism: FSDP2 over the cp ranks
    "cp2xtp2": (4, ["--parallel.cp", "2", "--parallel.tp", "2", "--parallel.data_parallel", "zero3"]),
}


@pytest.mark.parametrize("method, weights, case", [
    ("dpo", "lora", "cp2"),
    pytest.param("dpo", "full", "dp_shard2xcp2", marks=pytest.mark.slow),
    pytest.param("dpo", "lora", "dp_shard2xcp2", marks=pytest.mark.slow),
    pytest.param("dpo", "lora", "cp2xtp2", marks=pytest.mark.slow),
    pytest.param("ipo", "lora", "cp2", marks=pytest.mark.slow),
    pytest.param("simpo", "full", "cp2", marks=pytest.mark.slow),
    pytest.param("orpo", "lora", "cp2", marks=pytest.mark.slow),
    pytest.param("reward", "full", "cp2", marks=pytest.mark.slow),
    pytest.param("reward", "lora", "dp_shard2xcp2", marks=pytest.mark.slow),
    pytest.param("reward", "full", "cp2xtp2", marks=pytest.mark.slow)])
def test_preference_methods_under_context_parallelism_match_one_process(prefs, tmp_path, method, weights, case):
    hf, data = prefs
    world_size, flags = CASES[case]
    args = ["--method", method, "--model", str(hf), "--data", str(data), "--weights", weights, *COMMON]
    one = _run(args, tmp_path / "one")
    many = _run([*args, *flags], tmp_path / "many", world_size, port=29700 + world_size)
    keys = ["loss", "grad_norm", "accuracy" if method == "reward" else "reward_margin"]
    assert any(r.get("grad_norm", 0) > 0 for r in one)
    _close(many, one, keys)


def test_grpo_with_context_parallelism_is_refused_in_one_line(prefs, tmp_path, capsys):
    from cybertron.cli import main as cli_main

    hf, data = prefs
    code = cli_main(["align", "--method", "grpo", "--reward", "r.py:f", "--model", str(hf), "--data", str(data),
                     "--parallel.cp", "2", "--nproc", "2", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "parallel.cp=2 does not run with grpo" in err and "KV cache" in err
    assert not (tmp_path / "x").exists()
    # DDP would replicate tensor-parallel weights over the cp ranks: refused before any process starts
    assert cli_main(["align", "--model", str(hf), "--data", str(data), "--parallel.cp", "2", "--parallel.tp", "2",
                     "--nproc", "4", "--out", str(tmp_path / "x")]) == 2
    assert "does not compose with tp/pp" in capsys.readouterr().err

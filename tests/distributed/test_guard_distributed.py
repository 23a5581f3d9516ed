"""The non-finite guard on 2 gloo ranks: a NaN in rank 1's share of one global batch makes *every* rank skip
that step (rank 0's own loss is finite; it learns of the NaN through the global loss and gradient norm), and
the run ends where one process ends that never saw the batch."""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cybertron.config import CheckpointSection, EvalSection, LogSection, ParallelSection, TrainSection
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.parallel.apply import build_parallel_optimizer, parallelize
from cybertron.parallel.dims import ParallelDims, build_mesh
from cybertron.train import checkpoint as ckpt_io
from cybertron.train import session
from cybertron.train.trainer import Trainer
from tests.conftest import read_metrics
from tests.unit.train.test_guard import LR, SEQ_LEN, PoisonableStep, StreamTask, _run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS, POISONED = 6, 3  # loader batch 3 is step 4's
LAYOUTS = ("ddp", "zero3")
MODEL = preset_config("debug", vocab_size=64, n_layers=1, max_seq_len=SEQ_LEN)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    for layout in LAYOUTS:  # one world for both: starting processes is the slow part
        dims = ParallelDims.resolve(2, data_parallel=layout)
        mesh = build_mesh(dims, "cpu")
        par = parallelize(build_model(MODEL, seed=0), dims, mesh, ParallelSection(data_parallel=layout))
        optimizer = build_parallel_optimizer(par, dims, mesh, TrainSection(lr=LR, weight_decay=0.1))
        trainer = Trainer(par.model, optimizer, PoisonableStep(), lambda step: LR, 1.0, collectives=par.collectives)
        task = StreamTask(trainer, {POISONED: math.nan} if rank == 1 else {}, set(), dp_rank=rank, dp_size=2)
        run_dir = Path(out_dir) / layout
        driver = session.Driver(run_dir, None, trainer, par.parts, MODEL, STEPS, EvalSection(every=0),
                                CheckpointSection(every=0), LogSection(every=1, tensorboard=False, progress="lines"),
                                write_run_files=lambda d: None, is_main=rank == 0, barrier=dist.barrier)
        session.run(driver, task, par.parts[0])
        # AdamW's step count on this rank: one less than the steps run if this rank skipped one.
        counts = {float(s["step"]) for s in optimizer.state.values()}
        (run_dir / f"rank{rank}.json").write_text(json.dumps({"adam_steps": sorted(counts)}))
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard")
    mp.spawn(_worker, args=(29671, str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rank_skips_a_step_whose_nan_only_one_rank_saw(runs, tmp_path, layout):
    run_dir = runs / layout
    for rank in (0, 1):
        assert json.loads((run_dir / f"rank{rank}.json").read_text()) == {"adam_steps": [STEPS - 1.0]}
    assert [r["step"] for r in read_metrics(run_dir) if "skipped" in r] == [POISONED + 1]
    never_saw, _ = _run(tmp_path / "one", steps=STEPS - 1, drop={POISONED})
    # step k of the 2-rank run is step k-1 of the one that never saw the poisoned batch, from step 4 on
    two = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    assert two == pytest.approx(one, rel=1e-5)
    trained = build_model(MODEL, seed=1)
    ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(run_dir), trained, None)
    for (name, a), b in zip(trained.state_dict().items(), never_saw.model.state_dict().values(), strict=True):
        # An update more or less would move the weights by about the learning rate; AdamW turns last-bit
        # differences of the 2-rank gradient sums into larger ones only where a gradient is near zero.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)

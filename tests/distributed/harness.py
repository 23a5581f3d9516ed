"""Runs many parallel layouts inside one torch.distributed world and writes their results to a JSON file
that the pytest process asserts on (one world per world size: starting processes is the slow part).

Every layout trains the same model from the same seed on the same token stream as `reference_run` (one
process), with gradient accumulation and gradient clipping on."""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cybertron.config import ParallelSection, TrainSection
from cybertron.data.loader import PackedLoader
from cybertron.models.config import ModelConfig
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.parallel.apply import build_parallel_optimizer, parallelize
from cybertron.parallel.dims import ParallelDims, build_mesh, dp_mesh
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.float8 import convert_to_float8
from cybertron.train.optim import build_optimizer
from cybertron.train.schedule import lr_at
from cybertron.train.trainer import LanguageModelStep, Trainer

SEQ_LEN = 32
STEPS = 6
MODEL = preset_config("debug", vocab_size=256)  # dim 64, 4 layers, 4 heads / 2 kv heads, ffn 128
# The same with mixtures of 4 experts (top 2, expert ffn 64) in layers 1-3, layer 0 dense.
MOE_MODEL = preset_config("debug", vocab_size=256, n_experts=4, top_k=2, moe_ffn_dim=64, first_k_dense=1)


@dataclass
class Layout:
    parallel: dict = field(default_factory=dict)  # ParallelSection fields
    micro_batch: int = 2  # per-rank sequences per forward/backward (gradient accumulation below)
    global_batch: int = 16
    save_at: int = 0  # save a DCP checkpoint after this step into <out_dir>/<name>
    resume_from: str = ""  # layout name whose checkpoint to load, then train one step
    record_batch: bool = False
    fp8: str = "none"  # train.fp8's recipe, in torchao's emulation (float8 casts, fp32 matmuls: runs on CPU)
    fused_loss: bool = False
    steps: int = STEPS  # train the first `steps` of the STEPS-step schedule
    moe: bool = False  # train MOE_MODEL instead of MODEL
    documents: bool = False  # rows are packed documents (positions restart at each document's first token)

    @property
    def model(self) -> ModelConfig:
        return MOE_MODEL if self.moe else MODEL


def train_section(layout: Layout) -> TrainSection:
    return TrainSection(steps=STEPS, global_batch_size=layout.global_batch, micro_batch_size=layout.micro_batch,
                        lr=3e-3, warmup_steps=2, grad_clip=0.5, seed=0)


def tokens() -> np.ndarray:
    return np.random.default_rng(1234).integers(0, MODEL.vocab_size, 40_000).astype(np.int32)


def document_positions(inputs: torch.Tensor) -> torch.Tensor:
    """Positions of rows packed with documents: a document starts at column 0 and at every token divisible
    by 13 (a deterministic function of the data, so every layout packs the same way), positions count from
    there."""
    starts = inputs % 13 == 0
    starts[:, 0] = True
    cols = torch.arange(inputs.shape[1]).expand_as(inputs)
    last_start = torch.where(starts, cols, torch.zeros_like(cols)).cummax(dim=1).values
    return cols - last_start


def _micro_batches(loader: PackedLoader, micro: int, documents: bool = False) -> list[dict]:
    inputs, labels = loader.next_batch()
    micro = micro or inputs.shape[0]
    batches = [{"inputs": i, "labels": t} for i, t in zip(inputs.split(micro), labels.split(micro))]
    if documents:
        batches = [{**b, "positions": document_positions(b["inputs"])} for b in batches]
    return batches


def reference_run(layout: Layout, steps: int | None = None, out_dir: Path | None = None, name: str = "") -> dict:
    """One process, no torch.distributed: the numbers every layout must reproduce."""
    t = train_section(layout)
    model = build_model(layout.model, seed=0)
    if layout.fp8 != "none":
        convert_to_float8(model, layout.fp8, emulate=True)
    opt = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    trainer = Trainer(model, opt, LanguageModelStep(fused_loss=layout.fused_loss), _schedule(t), t.grad_clip)
    loader = PackedLoader(tokens(), SEQ_LEN, t.global_batch_size, seed=0)
    return _train(trainer, loader, [model], layout, t, steps or layout.steps, out_dir, name, is_main=True)


def _schedule(t: TrainSection):
    return lambda step: lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)


def _train(trainer, loader, parts, layout: Layout, t: TrainSection, steps: int, out_dir, name, is_main,
           barrier=lambda: None) -> dict:
    result: dict = {"losses": [], "grad_norms": []}
    start = 0
    if layout.resume_from:
        state = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(out_dir / layout.resume_from), parts,
                                        trainer.optimizer)
        loader.load_state_dict(state["loader"])
        start = int(state["step"])
        steps = start + 1
    trainer.model.train()
    for step in range(start, steps):
        if layout.record_batch:
            result.setdefault("batches", []).append(_peek_global_batch(loader))
        res = trainer.train_step(step, _micro_batches(loader, layout.micro_batch, layout.documents))
        result["losses"].append(res.loss.item())
        result["grad_norms"].append(res.grad_norm.item())
        if layout.save_at and step + 1 == layout.save_at:
            ckpt_io.save_checkpoint(out_dir / name, step + 1, parts, trainer.optimizer,
                                    {"loader": loader.state_dict()}, layout.model, is_main=is_main, barrier=barrier)
    result["val_loss"] = trainer.evaluate([_micro_batches(loader, 0, layout.documents)[0]])
    return result


def _peek_global_batch(loader: PackedLoader) -> list[int]:
    """Checksum of the next *global* batch (all dp ranks' shares), without consuming it."""
    whole = PackedLoader(loader._tokens, loader.seq_len, loader.global_batch_size, seed=loader.seed)
    whole.load_state_dict(loader.state_dict())
    inputs, _ = whole.next_batch()
    return inputs.sum(dim=1).tolist()


def parallel_run(layout: Layout, world_size: int, out_dir: Path, name: str) -> dict:
    t = train_section(layout)
    pcfg = replace(ParallelSection(), **layout.parallel)
    dims = ParallelDims.resolve(world_size, pcfg.dp_replicate, pcfg.dp_shard, pcfg.tp, pcfg.pp,
                                pcfg.data_parallel, cp=pcfg.cp, ep=pcfg.ep)
    dims.validate_model(layout.model)
    mesh = build_mesh(dims, "cpu")
    model = build_model(layout.model, seed=0)  # the full model on every rank, then sharded: identical weights
    par = parallelize(model, dims, mesh, pcfg, fp8=layout.fp8, fused_loss=layout.fused_loss, fp8_emulate=True)
    opt = build_parallel_optimizer(par, dims, mesh, t)
    trainer = Trainer(par.model, opt, par.step_fn, _schedule(t), t.grad_clip, collectives=par.collectives,
                      strategy=par.strategy)
    loader = PackedLoader(tokens(), SEQ_LEN, t.global_batch_size, dp_rank=dp_mesh(mesh).get_local_rank(),
                          dp_size=dims.dp, seed=0)
    result = _train(trainer, loader, par.parts, layout, t, layout.steps, out_dir, name, dist.get_rank() == 0,
                    barrier=dist.barrier)
    return {**result, **(_float8_census(par.model) if layout.fp8 != "none" else {})}


def _float8_census(model: torch.nn.Module) -> dict:
    """What the fp8 layout really ran: how many Float8Linear layers, and how many of their weights FSDP2
    all-gathers in float8 (torchao's WeightWithDynamicFloat8CastTensor shards)."""
    from torch.distributed.tensor import DTensor
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    gathered = [m for m in linears if isinstance(m.weight, DTensor)
                and isinstance(m.weight._local_tensor, WeightWithDynamicFloat8CastTensor)]
    return {"float8_linears": len(linears), "float8_all_gathered": len(gathered)}


def worker(rank: int, world_size: int, port: int, layouts: dict[str, Layout], out_dir: str) -> None:
    """mp.spawn entry (module level): run every layout in turn, rank 0 writes results.json."""
    torch.set_num_threads(1)  # 2 cores shared by all ranks: one thread each (ARCHITECTURE.md pitfall 1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
    out = Path(out_dir)
    results = {}
    for name, layout in layouts.items():
        try:
            results[name] = parallel_run(layout, world_size, out, name)
        except Exception as err:  # record and go on: one broken layout must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
            print(f"rank {rank} layout {name}: {results[name]['trace']}", file=sys.stderr, flush=True)
        dist.barrier()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world_size: int, layouts: dict[str, Layout], out_dir: Path, port: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(world_size, port, layouts, str(out_dir)), nprocs=world_size, join=True)
    return json.loads((out_dir / "results.json").read_text())

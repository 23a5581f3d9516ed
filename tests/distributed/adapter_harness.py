"""Full, LoRA, DoRA and QLoRA fine-tuning steps under `parallelize()` layouts (TP, TP+SP, FSDP x TP, activation
checkpointing, CPU offload), against the same steps in one process.

Every run builds the same tiny model from the same seed, swaps in adapters with `finetune.lora.apply_lora`
(fixed seed; QLoRA then stores the base in NF4), then trains with the Trainer on the harness's token stream.
A run also reports how far its frozen parameters moved (their local shards before and after training; 0 means
the base stayed frozen)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

from cybertron.config import ParallelSection, TrainSection
from cybertron.data.loader import PackedLoader
from cybertron.finetune.lora import LoRASpec, apply_lora
from cybertron.finetune.quant import nf4_storage_bytes, quantize_base_
from cybertron.models.llama import build_model
from cybertron.parallel.apply import build_parallel_optimizer, parallelize
from cybertron.parallel.dims import ParallelDims, build_mesh, dp_mesh
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import LanguageModelStep, Trainer
from tests.distributed.harness import MODEL, SEQ_LEN, _micro_batches, _schedule, tokens

STEPS = 4
METHODS = ("full", "lora", "dora")


@dataclass
class AdapterRun:
    method: str  # full, lora, dora or qlora
    parallel: dict = field(default_factory=dict)  # ParallelSection fields
    fused_loss: bool = False


def train_section() -> TrainSection:
    # A large learning rate so that B (zero at the start) and A move well away from their initial values.
    return TrainSection(steps=STEPS, global_batch_size=8, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                        grad_clip=1.0, seed=0)


def build(method: str) -> nn.Module:
    model = build_model(MODEL, seed=0)
    if method != "full":
        apply_lora(model, LoRASpec(rank=4, alpha=8.0, dora=method == "dora"), seed=0)
    if method == "qlora":
        quantize_base_(model)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if isinstance(t, DTensor) else t
    if hasattr(t, "quantized_data"):  # an NF4 base: its 4-bit codes stand for it
        return t.quantized_data.float()
    return t.detach().clone()


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the NF4 base held by this process (its shard under ZeRO-3), and of those the bytes every
    shard keeps whole (each weight's 16-entry code table and scale mean)."""
    weights = [t for p in model.parameters()
               if hasattr(t := p.to_local() if isinstance(p, DTensor) else p, "quantized_data")]
    whole = sum(t.nf4.numel() * t.nf4.element_size() + t.scaler_mean.numel() * t.scaler_mean.element_size()
                for t in weights)
    return sum(nf4_storage_bytes(t) for t in weights), whole


def _frozen(model: nn.Module, trainable: bool = False) -> list[torch.Tensor]:
    return [_local(p) for p in model.parameters() if p.requires_grad == trainable]


def _moved(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    return max((float((a - b).abs().max()) for a, b in zip(after, before) if a.numel()), default=0.0)


def _train(trainer: Trainer, loader: PackedLoader, model: nn.Module) -> dict:
    frozen, trained = _frozen(model), _frozen(model, trainable=True)
    result: dict = {"losses": [], "grad_norms": [],
                    "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    trainer.model.train()
    for step in range(STEPS):
        res = trainer.train_step(step, _micro_batches(loader, 2))
        result["losses"].append(res.loss.item())
        result["grad_norms"].append(res.grad_norm.item())
    result["frozen_moved"] = _moved(_frozen(model), frozen)
    result["trained_moved"] = _moved(_frozen(model, trainable=True), trained)
    result["n_frozen"] = len(frozen)
    result["nf4_bytes"] = nf4_bytes(model)
    return result


def reference_run(method: str, fused_loss: bool = False) -> dict:
    t = train_section()
    model = build(method)
    opt = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    trainer = Trainer(model, opt, LanguageModelStep(fused_loss=fused_loss), _schedule(t), t.grad_clip)
    return _train(trainer, PackedLoader(tokens(), SEQ_LEN, t.global_batch_size, seed=0), model)


def parallel_run(run: AdapterRun, world_size: int) -> dict:
    t = train_section()
    pcfg = replace(ParallelSection(), **run.parallel)
    dims = ParallelDims.resolve(world_size, pcfg.dp_replicate, pcfg.dp_shard, pcfg.tp, pcfg.pp, pcfg.data_parallel)
    mesh = build_mesh(dims, "cpu")
    # QLoRA: every rank quantized the same weights; DDP's start-up broadcast would alter the NF4 base
    # (ARCHITECTURE.md pitfall 13).
    par = parallelize(build(run.method), dims, mesh, pcfg, replicas_equal=run.method == "qlora",
                      fused_loss=run.fused_loss)
    opt = build_parallel_optimizer(par, dims, mesh, t)
    trainer = Trainer(par.model, opt, par.step_fn, _schedule(t), t.grad_clip, collectives=par.collectives,
                      strategy=par.strategy)
    loader = PackedLoader(tokens(), SEQ_LEN, t.global_batch_size, dp_rank=dp_mesh(mesh).get_local_rank(),
                          dp_size=dims.dp, seed=0)
    result = _train(trainer, loader, par.model)
    moved = torch.tensor([result["frozen_moved"]])
    dist.all_reduce(moved, op=dist.ReduceOp.MAX)  # every rank's shards, not only rank 0's
    result["frozen_moved"] = moved.item()
    result["trainable_dtensors"] = sum(isinstance(p, DTensor) for p in par.model.parameters() if p.requires_grad)
    return result


def worker(rank: int, world_size: int, port: int, runs: dict[str, AdapterRun], out_dir: str) -> None:
    """mp.spawn entry (module level): every run in turn; rank 0 writes results.json."""
    torch.set_num_threads(1)  # ARCHITECTURE.md pitfall 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
    results = {}
    for name, run in runs.items():
        try:
            results[name] = parallel_run(run, world_size)
        except Exception as err:  # record and go on: one broken run must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
            print(f"rank {rank} run {name}: {results[name]['trace']}", file=sys.stderr, flush=True)
        dist.barrier()
    if rank == 0:
        (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world_size: int, runs: dict[str, AdapterRun], out_dir: Path, port: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(world_size, port, runs, str(out_dir)), nprocs=world_size, join=True)
    return json.loads((out_dir / "results.json").read_text())

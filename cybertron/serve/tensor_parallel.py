"""`cybertron serve --tp N` / `cybertron generate --tp N`: one model sharded over N local ranks.

As `cybertron train --nproc N` does, the command starts the ranks itself with torchrun (which re-enter the
command), or runs as one rank under the user's own `torchrun --nproc-per-node N -m cybertron serve --tp N`.
Each rank loads the model, shards it with the training plan (parallel/plans.py: column-parallel q/k/v and
gate/up, row-parallel o/down, the output head gathered whole; no sequence or loss parallelism, so every rank
ends with the whole logits) and builds the same engine over its share of the KV heads. How the ranks stay in
step is serve/mirror.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from cybertron.config import opt
from cybertron.errors import UserError
from cybertron.models.config import ModelConfig
from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.plans import llama_tp_plan
from cybertron.parallel.runtime import DistEnv, launch_torchrun
from cybertron.parallel.tensor_parallel import apply_tensor_parallel
from cybertron.parallel.world import World, run_on_world
from cybertron.serve.engine import Engine, default_num_blocks
from cybertron.serve.mirror import LeaderEngine

T = TypeVar("T")
# What tensor parallelism must split evenly over the ranks: whole attention and KV heads, and FFN columns. The
# vocabulary (embedding rows, output head columns) may split unevenly: DTensor pads the last shard, and
# tokenizers' vocabularies are often odd.
SPLIT_FIELDS = ("n_kv_heads", "n_heads", "ffn_dim")


@dataclass
class TensorParallelSection:
    tp: int = opt(1, "tensor-parallel degree: shard the model over this many local ranks (started with torchrun; "
                     "or run under `torchrun --nproc-per-node N`); it must divide the model's KV heads")
    timeout_s: int = opt(600, "with tp > 1, seconds a collective inside a forward may wait before the ranks fail "
                              "(not hang)")


def check_tp_section(p: TensorParallelSection) -> None:
    if p.tp < 1:
        raise UserError(f"--tp must be >= 1, got {p.tp}")
    if p.timeout_s < 1:
        raise UserError(f"parallel.timeout_s must be >= 1, got {p.timeout_s}")


def check_tp_degree(cfg: ModelConfig, tp: int) -> None:
    """UserError unless `tp` splits the model evenly (checked from its config, before any weight is read)."""
    if tp > 1 and cfg.is_mla:
        raise UserError(f"--tp {tp} is not implemented for multi-head latent attention (DeepSeek); serve it with "
                        f"--tp 1")
    for name in SPLIT_FIELDS:
        value = getattr(cfg, name)
        if value % tp:
            raise UserError(f"--tp {tp} does not divide the model's {name}={value}; tensor parallelism gives "
                            f"each rank an equal share of them, so use a --tp that divides {value}")


def check_tp_devices(device: torch.device, tp: int) -> None:
    """UserError unless this machine has a GPU for each of the `tp` local ranks (rank i takes cuda:i)."""
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        raise UserError(f"--tp {tp} on {device.type} starts {tp} ranks, one per GPU, but this machine has "
                        f"{torch.cuda.device_count()}; use --tp {torch.cuda.device_count()} or fewer")


def needs_launch(tp: int, env: DistEnv) -> bool:
    """Whether this process should start `tp` ranks with torchrun (True), or is the one rank to run (False)."""
    if env.world_size > 1 and env.world_size != tp:
        raise UserError(f"this command runs on {env.world_size} ranks (torchrun --nproc-per-node) but --tp is "
                        f"{tp}; give the same number to both")
    return tp > 1 and env.world_size == 1


def launch_ranks(tp: int, argv: list[str], command: str, signal_ends_well: bool = False) -> int:
    """Start `tp` local ranks running `cybertron <command> argv` with torchrun and wait for them. SIGTERM or
    SIGINT here makes torchrun pass the signal on to every rank, wait for them to exit and raise: for a server
    (signal_ends_well: rank 0 shuts down and stops the others) that is its ordinary end, exit code 0; else
    128 + the signal, as a shell reports it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        return launch_torchrun(tp, argv, command)
    except SignalException as err:
        return 0 if signal_ends_well else 128 + int(err.sigval)


def run_on_ranks(env: DistEnv, tp: int, device: torch.device, timeout_s: int, body: Callable[[World], T]) -> T:
    """Run `body` on this rank with the process group and a tensor-parallel mesh of every rank (gloo on CPU,
    NCCL on CUDA, where the rank takes cuda:LOCAL_RANK), torn down afterwards (barrier, then destroy)."""
    return run_on_world(env, ParallelDims.resolve(tp, tp=tp), str(device), timeout_s, body)


def shard_model(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard a loaded model in place for serving: attention finds its local heads from the weights' shapes."""
    return apply_tensor_parallel(model, tp_mesh, llama_tp_plan(sequence_parallel=False, loss_parallel=False))


def agreed_num_blocks(model: nn.Module, block_size: int, device: torch.device, max_batch_size: int,
                      num_blocks: int | None) -> int:
    """The KV pool size every rank uses: the one asked for, else the smallest default over the ranks (free
    memory differs between GPUs, and ranks with different pools would preempt differently)."""
    if num_blocks:
        return num_blocks
    dtype = next(model.parameters()).dtype
    blocks = torch.tensor([default_num_blocks(model, block_size, dtype, device, max_batch_size, None)],
                          device=device)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
    return int(blocks.item())


def rank_engine_options(model: nn.Module, world: World) -> dict:
    """Engine options for a model sharded over world's tp ranks: its share of the KV heads, eager decoding
    (CUDA graphs of a forward holding collectives are not used here)."""
    return {"device": world.device, "decode_graphs": False, "kv_heads": model.config.n_kv_heads // world.dims.tp}


def rank_engine(model: nn.Module, tokenizer, world: World, channel: dist.ProcessGroup, **options) -> Engine:
    """This rank's engine over a sharded model, for a server: a LeaderEngine on rank 0, a plain Engine (which
    serve/mirror.follow drives) on the others."""
    options.update(rank_engine_options(model, world))
    if world.is_main:
        return LeaderEngine(model, tokenizer, channel=channel, **options)
    return Engine(model, tokenizer, **options)

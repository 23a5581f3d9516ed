"""The distributed entry point's plumbing: torchrun's environment (read once, here), layout validation
against the config, process-group and mesh setup / teardown, and `--nproc` (which runs torchrun itself).

`--max-restarts N` (with `--nproc`) hands failures to torchrun's elastic agent: when a rank dies, it stops
the others and starts them all again, up to N times. A restarted rank (TORCHELASTIC_RESTART_COUNT > 0) resumes
from the newest complete checkpoint of the run directory, or starts over when there is none yet."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from cybertron.errors import ConfigError
from cybertron.models.config import ModelConfig
from cybertron.parallel.activation_checkpoint import MODES
from cybertron.parallel.dims import ParallelDims, build_mesh
from cybertron.parallel.pipeline import validate_schedule
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.session import find_resume_checkpoint, resolve_run_dir

LAUNCHER_HELP = ("\n--nproc N: start N local ranks with torchrun"
                 "\n--max-restarts N: with --nproc, restart the ranks up to N times when one fails; they resume "
                 "from the newest checkpoint")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the world, as torchrun (or Slurm via torchrun) describes it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0  # how many times torchrun's elastic agent has restarted the ranks

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> DistEnv:
        return cls(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)),
                   int(environ.get("WORLD_SIZE", 1)), int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def layout_dims(cfg, world_size: int, model_cfg: ModelConfig | None = None) -> ParallelDims:
    """Validate the [parallel] section against the world size, the batch sizes and (if given) the model
    shape; ConfigError names the constraint. Runs before any process group or model exists."""
    p, t = cfg.parallel, cfg.train
    dims = ParallelDims.resolve(world_size, p.dp_replicate, p.dp_shard, p.tp, p.pp, p.data_parallel, cp=p.cp,
                                ep=p.ep)
    if p.activation_checkpoint not in MODES:
        raise ConfigError(f"parallel.activation_checkpoint must be one of {', '.join(MODES)}, "
                          f"got {p.activation_checkpoint!r}")
    if p.pp_virtual_stages < 1 or p.pp_microbatches < 0 or p.timeout_s < 1:
        raise ConfigError("parallel.pp_virtual_stages and parallel.timeout_s must be >= 1 and "
                          "parallel.pp_microbatches >= 0")
    # DDP (and ZeRO-1's) replicas span dp x cp: context parallelism counts, as in apply._apply_data_parallel.
    if dims.dp_cp > 1 and dims.data_parallel in ("ddp", "zero1") and (dims.tp > 1 or dims.pp > 1):
        raise ConfigError(f"parallel.data_parallel={dims.data_parallel} does not compose with tp/pp; use zero2 "
                          "or zero3 (FSDP2) for the data-parallel part of a multi-dimensional layout")
    if p.cpu_offload and (dims.data_parallel not in ("zero2", "zero3") or world_size == 1):
        raise ConfigError("parallel.cpu_offload needs FSDP: parallel.data_parallel zero2 or zero3 on more "
                          "than one process")
    # data.seq_len 0 (fine-tuning: the model's context) is checked once the model is known
    if dims.tp > 1 and p.sequence_parallel and cfg.data.seq_len and cfg.data.seq_len % dims.tp:
        raise ConfigError(f"parallel.tp={dims.tp} must divide data.seq_len={cfg.data.seq_len} with "
                          "parallel.sequence_parallel=true (each rank holds an equal slice of the sequence)")
    if cfg.data.seq_len:
        dims.validate_seq_len(cfg.data.seq_len, p.sequence_parallel)
    virtual = p.pp_virtual_stages if dims.pp > 1 else 1
    if dims.pp > 1:
        validate_schedule(p.pp_schedule, dims.pp, virtual, p.pp_microbatches or dims.pp * virtual, dims.tp,
                          sharded_dp=dims.dp > 1 or p.cpu_offload)
    dims.validate_batch(t.global_batch_size, t.micro_batch_size, p.pp_microbatches, virtual)
    if model_cfg is not None:
        dims.validate_model(model_cfg, virtual)
    return dims


def init_distributed(env: DistEnv, dims: ParallelDims, device: torch.device, timeout_s: int):
    """Join the process group (gloo on CPU, NCCL on CUDA) and build the mesh; None for one process."""
    if not dims.is_distributed:
        return None
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return build_mesh(dims, device.type)


def shutdown_distributed(clean: bool = True) -> None:
    """barrier then destroy: without the barrier ranks sometimes abort at exit after the work is done.
    After an error (clean=False) the barrier is skipped, so a failing rank exits instead of waiting."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list[str], command: str = "train", max_restarts: int = 0) -> int:
    """`cybertron <command> --nproc N ...`: start N local ranks with torchrun (torch.distributed.run), which
    restarts them all up to `max_restarts` times when one fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if max_restarts:
        # Restarted ranks otherwise share the agent's TCP store with the ranks they replace, and gloo reads the
        # dead ranks' addresses from it ("Connection refused"; pytorch/pytorch#135712): each round of ranks
        # gets a store of its own. torchrun runs in this process, so its setting lives in our environment.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun_main(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                       "-m", "cybertron", command, *argv])
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        return next((c for c in codes if c > 0), 1)
    return 0


def pop_launcher_flag(argv: list[str], flag: str, minimum: int) -> tuple[int | None, list[str]]:
    """Take `flag N` / `flag=N` out of argv (a launcher flag such as --nproc, not a config key)."""
    rest, found, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag or arg.startswith(f"{flag}="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < minimum:
                what = "a positive number of processes" if minimum else "a number of restarts (0 or more)"
                raise ConfigError(f"{flag} expects {what}, got {value!r}")
            found = int(value)
            continue
        rest.append(arg)
        i += 1
    return found, rest


def pop_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """Take `--nproc N` / `--nproc=N` out of argv (it is a launcher flag, not a config key)."""
    return pop_launcher_flag(argv, "--nproc", minimum=1)


def resume_after_restart(cfg: Any, env: DistEnv) -> None:
    """In a rank torchrun restarted: continue from the run directory's newest complete checkpoint (sets
    run.resume), so the restarted ranks repeat no finished step; with no checkpoint yet, start over."""
    run = getattr(cfg, "run", None)
    if env.restart_count == 0 or run is None or run.resume or not run.out:
        return
    latest = ckpt_io.latest_checkpoint(Path(run.out))
    if latest is not None:
        run.resume = True
    if env.is_main:
        print(f"restart {env.restart_count}: " + (f"resuming from {latest}" if latest is not None else
                                                  "no checkpoint yet, starting over"), flush=True)


def command_main(argv: list[str], command: str, parse: Callable[[list[str]], Any],
                 validate: Callable[[Any, int], None], run: Callable[[Any, DistEnv], Any]) -> int:
    """What every training command's main does: read torchrun's environment, take `--nproc N` and
    `--max-restarts N` out, parse and validate the config against the world size it will run on (before any
    process starts), then either start N local ranks with torchrun (which re-enter here) or run this rank."""
    env = DistEnv.from_environ()  # torchrun's variables, read once here
    nproc, argv = pop_nproc(argv)
    max_restarts, argv = pop_launcher_flag(argv, "--max-restarts", minimum=0)
    cfg = parse(argv)
    launching = bool(nproc) and env.world_size == 1 and (nproc > 1 or bool(max_restarts))
    if max_restarts and not launching:
        raise ConfigError("--max-restarts restarts the ranks that --nproc N starts; add --nproc N (under your own "
                          "torchrun, pass torchrun's --max-restarts instead)")
    world_size = nproc if nproc and env.world_size == 1 else env.world_size
    validate(cfg, world_size)
    resume_after_restart(cfg, env)
    if launching:
        run_section = getattr(cfg, "run", None)
        if run_section is not None:
            if max_restarts and not run_section.out:
                # Every restart must find the same directory: resolve the timestamped default once, here.
                run_section.out = str(resolve_run_dir(cfg))
                argv = [*argv, f"--run.out={run_section.out}"]
            if run_section.out:
                # Checked once here too: inside the ranks, a bad --resume would print one error line per rank.
                find_resume_checkpoint(Path(run_section.out), run_section.resume, report=False)
        return launch_torchrun(nproc, argv, command, max_restarts or 0)
    run(cfg, env)
    return 0

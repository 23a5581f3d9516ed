"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable across layouts, and atomic.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only once every file is
on disk, so a run killed mid-save leaves the previous checkpoint as the newest complete one. A complete
checkpoint holds DCP's `.metadata`, `trainer_state.json` (step, data position) and `model_config.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from cybertron.errors import CheckpointError
from cybertron.models.config import ModelConfig
from cybertron.train.optim import PartsOptimizer

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
# Optimizer state keyed per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): the same keys
# whatever layout saved it, so any rank (a pipeline stage, a ZeRO-1 partition) saves and loads its own share.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first (temporary, half-written ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # DCP warns that it runs "in a single process" whenever no process group exists: that is intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


Model = nn.Module | list[nn.Module]


def _pairs(model: Model, optimizer: Any) -> list[tuple[nn.Module, Any]]:
    """(module, its optimizer) pairs: one for a whole model, one per pipeline stage held by this rank (the
    modules given may be views of the stages the optimizer holds, e.g. their adapters alone)."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if isinstance(optimizer, PartsOptimizer):
        assert len(models) == len(optimizer.parts), "one saved module per pipeline stage"
        return [(m, opt) for m, (_, opt) in zip(models, optimizer.parts)]
    assert optimizer is None or len(models) == 1, "several model parts need a PartsOptimizer"
    return [(m, optimizer) for m in models]


def _zero1_state(model: nn.Module, zero: ZeroRedundancyOptimizer, allocate: bool) -> dict[str, Any]:
    """Flat optimizer state of the parameters this rank's ZeRO-1 partition owns (allocate: empty tensors
    of the right shapes to load into)."""
    module = getattr(model, "module", model)  # DDP
    names = {id(p): n for n, p in module.named_parameters()}
    out: dict[str, Any] = {}
    for group in zero.optim.param_groups:
        for p in group["params"]:
            fqn = names[id(p)]
            if allocate:
                zero.optim.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                       "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            else:
                out.update({f"param_groups.{fqn}.{k}": v for k, v in group.items() if k != "params"})
            out.update({f"state.{fqn}.{k}": v for k, v in zero.optim.state.get(p, {}).items()})
    return out


def collect_state(model: Model, optimizer: Any, for_load: bool = False) -> list[dict[str, Any]]:
    """Per (module, optimizer) pair: {"model": ..., "optim": ...} state dicts with layout-free keys."""
    out = []
    for module, opt in _pairs(model, optimizer):
        if opt is None:
            out.append({"model": get_model_state_dict(module)})
        elif isinstance(opt, ZeroRedundancyOptimizer):
            out.append({"model": get_model_state_dict(module), "optim": _zero1_state(module, opt, for_load)})
        else:
            model_sd, optim_sd = get_state_dict(module, opt, options=_FLAT)
            out.append({"model": model_sd, "optim": optim_sd})
    return out


def _merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        for key, sd in part.items():
            merged.setdefault(key, {}).update(sd)
    return merged


def apply_state(model: Model, optimizer: Any, parts: list[dict[str, Any]], loaded: dict[str, Any]) -> None:
    """Write `loaded` (what DCP filled in) back into each module and optimizer."""
    for (module, opt), part in zip(_pairs(model, optimizer), parts):
        model_sd = {k: loaded["model"][k] for k in part["model"]}
        if opt is None or isinstance(opt, ZeroRedundancyOptimizer):
            set_model_state_dict(module, model_sd)  # ZeRO-1 state was loaded in place into its tensors
        else:
            optim_sd = {k: loaded["optim"][k] for k in part["optim"]}
            set_state_dict(module, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_FLAT)


def save_checkpoint(run_dir: Path, step: int, model: Model, optimizer: Any,
                    trainer_state: dict[str, Any], model_config: ModelConfig, keep: int = 2,
                    is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Save on every rank (DCP is collective); rank 0 publishes it atomically and applies retention."""
    root = Path(run_dir) / CHECKPOINTS
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    state = _merged(collect_state(model, optimizer))
    with _quiet():
        dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if is_main:
        _fsync_write(tmp / MODEL_CONFIG, json.dumps(asdict(model_config), indent=2))
        _fsync_write(tmp / TRAINER_STATE, json.dumps({"step": step, **trainer_state}, indent=2))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace only once complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or corrupted ({TRAINER_STATE}: {err}); "
                              "delete it to resume from an older one") from err


def read_model_config(ckpt: Path) -> ModelConfig:
    try:
        return ModelConfig(**json.loads((Path(ckpt) / MODEL_CONFIG).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {ckpt} has no readable {MODEL_CONFIG} ({err})") from err


def load_checkpoint(ckpt: Path, model: Model, optimizer: Any) -> dict[str, Any]:
    """Load model (and optimizer) state in place, whatever layout saved it; returns the trainer state."""
    ckpt = Path(ckpt)
    state_meta = read_trainer_state(ckpt)
    if not (ckpt / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: DCP .metadata is missing")
    parts = collect_state(model, optimizer, for_load=True)
    state = _merged(parts)
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(ckpt))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded, it is corrupted or from another model "
                              f"({first_line}); delete it to resume from an older one") from err
    apply_state(model, optimizer, parts, state)
    return state_meta


def resolve_checkpoint(path: Path) -> Path:
    """A run directory (newest complete checkpoint) or a checkpoint directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / TRAINER_STATE).is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (expected {CHECKPOINTS}/step-N/)")
    return ckpt

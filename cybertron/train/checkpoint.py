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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from cybertron.errors import CheckpointError
from cybertron.models.config import ModelConfig

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"


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


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], model_config: ModelConfig, keep: int = 2,
                    is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Save on every rank (DCP is collective); rank 0 publishes it atomically and applies retention."""
    root = Path(run_dir) / CHECKPOINTS
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    state = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
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


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load model (and optimizer) state in place, whatever layout saved it; returns the trainer state."""
    ckpt = Path(ckpt)
    state_meta = read_trainer_state(ckpt)
    if not (ckpt / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: DCP .metadata is missing")
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_state_dict(model, [])[0]}
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(ckpt))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded, it is corrupted or from another model "
                              f"({first_line}); delete it to resume from an older one") from err
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
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


def load_inference_model(run_dir: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a run directory's newest checkpoint (or a checkpoint directory), in eval mode."""
    from cybertron.data.tokenizer import TextTokenizer
    from cybertron.models.llama import Transformer

    ckpt = resolve_checkpoint(Path(run_dir))
    cfg = read_model_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    load_checkpoint(ckpt, model, None)
    tok_path = next((p for p in (ckpt.parent.parent / "tokenizer.json", ckpt / "tokenizer.json") if p.is_file()),
                    None)
    if tok_path is None:
        raise CheckpointError(f"no tokenizer.json next to checkpoint {ckpt}")
    return model.eval(), TextTokenizer.load(tok_path)

"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable across layouts, atomic and verified.

A checkpoint is written into `checkpoints/.tmp-step-N/`; once every rank's files are on disk the main rank adds
`trainer_state.json` (step, data position), `model_config.json` and, last, `manifest.json` (the size and SHA-256
of every file, manifest.py), then renames the directory to `step-N/`. A run killed or out of disk mid-save
therefore leaves the previous checkpoint as the newest published one, and retention deletes older ones only
after the new one is published.

Loading re-hashes a checkpoint against its manifest before DCP reads it; a run directory's newest damaged
checkpoints are passed over, one line each, for the newest intact one. DCP's own pickles are read with an
allowlist (safe_reader.py), so a run directory from someone else cannot run code. Checkpoints saved before
manifests existed (step-N/ with trainer_state.json and no manifest) still load, unverified, with a note.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
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
from cybertron.train.manifest import MANIFEST, has_manifest, verify, write_manifest
from cybertron.train.optim import PartsOptimizer
from cybertron.train.safe_reader import SafeLoadPlanner, SafeReader, read_metadata

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
# Optimizer state keyed per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): the same keys
# whatever layout saved it, so any rank (a pipeline stage, a ZeRO-1 partition) saves and loads its own share.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
Report = Callable[[str], None]


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints in `run_dir`, oldest first: step-N/ with a manifest, or with trainer_state.json
    alone (saved before manifests). Temporary, half-written ones are ignored. Not verified: see
    `intact_checkpoint`."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if _step_of(p) is not None and (has_manifest(p) or (p / TRAINER_STATE).is_file())]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """What makes `ckpt` unusable, naming the file, or None. Every file is re-hashed against the manifest; the
    trainer state and DCP metadata are then parsed (all a checkpoint without a manifest gets)."""
    ckpt = Path(ckpt)
    if has_manifest(ckpt):
        problem = verify(ckpt)
        if problem is not None:
            return problem
    try:
        json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE}: {_reason(err)}"
    try:
        read_metadata(ckpt)
    except Exception as err:  # a damaged pickle raises anything from EOFError to AttributeError
        return f".metadata: {_reason(err)}"
    return None


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (str(err).splitlines() or [""])[0][:200] or type(err).__name__


def intact_checkpoint(run_dir: Path, report: Report | None = to_stderr) -> Path | None:
    """The newest checkpoint of `run_dir` that passes `checkpoint_problem`; each newer, damaged one is
    reported in one line naming the file. None when the run has no checkpoint; CheckpointError when none is
    intact."""
    found = complete_checkpoints(run_dir)
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(found):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if report is not None:
                for bad, why in damaged:
                    report(f"warning: checkpoint {bad} is corrupted ({why}); falling back to {ckpt.name}")
                if not has_manifest(ckpt):
                    report(f"note: {ckpt} has no {MANIFEST} (saved before checkpoints were verified); "
                           "loading it unverified")
            return ckpt
        damaged.append((ckpt, problem))
    if not damaged:
        return None
    (newest, why), older = damaged[0], len(damaged) - 1
    also = f", and the {older} older one{'s are' if older > 1 else ' is'} too" if older else ""
    raise CheckpointError(f"checkpoint {newest} is corrupted ({why}){also}; no intact checkpoint is left in "
                          f"{run_dir}")


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    # DCP warns that it runs "in a single process" whenever no process group exists: that is intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def state_to_save(model: Model, optimizer: Any) -> dict[str, Any]:
    """What DCP saves for `model` and `optimizer`: {"model": ..., "optim": ...} with layout-free keys."""
    return _merged(collect_state(model, optimizer))


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


def prepare_save(run_dir: Path, step: int, is_main: bool) -> tuple[Path, Path]:
    """(temporary directory, final directory) of the checkpoint of `step`; the main rank clears a leftover
    temporary one (a killed save)."""
    root = Path(run_dir) / CHECKPOINTS
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise save_failed(err, tmp, is_main) from None
        shutil.rmtree(tmp, ignore_errors=True)
    return tmp, final


def publish(tmp: Path, final: Path, step: int, trainer_state: dict[str, Any], model_config: ModelConfig,
            keep: int) -> None:
    """Main rank, once every rank's DCP files are in `tmp`: the run files, the manifest last, the rename, and
    only then retention (the `keep` newest up to `step`; a newer one left by an earlier attempt is not this
    run's to delete)."""
    try:
        _fsync_write(tmp / MODEL_CONFIG, json.dumps(asdict(model_config), indent=2))
        _fsync_write(tmp / TRAINER_STATE, json.dumps({"step": step, **trainer_state}, indent=2))
        write_manifest(tmp)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace only once complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as err:
        raise save_failed(err, tmp, True) from None
    older = [p for p in complete_checkpoints(final.parent.parent) if (_step_of(p) or 0) <= step]
    for old in older[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind a failed save: raised directly, one rank's failure inside DCP's CheckpointException,
    or the context of the RuntimeError torch.save's zip writer raises when a write fails ("unexpected pos")."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        if isinstance(err, CheckpointException):
            found = (_os_error(exc) for exc, _trace in err.failures.values())
            return next((e for e in found if e is not None), None)
        err = err.__cause__ or err.__context__
    return None


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    exponent = min(3, (n.bit_length() - 1) // 10)
    return f"{n / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def save_failed(err: BaseException, tmp: Path, is_main: bool) -> BaseException:
    """A save that hit an OSError (a full disk, a quota, a read-only mount) as one CheckpointError naming the
    path and the free space; the half-written directory is removed to give the space back. Other errors are
    returned unchanged (bugs, to be seen with their traceback)."""
    os_err = _os_error(err)
    if os_err is None:
        return err
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    where = next(p for p in (tmp, *tmp.parents) if p.exists())
    free = shutil.disk_usage(where).free
    step = _step_of(tmp.parent / tmp.name.replace(".tmp-", "")) or 0
    earlier = [p for p in complete_checkpoints(tmp.parent.parent) if (_step_of(p) or 0) < step]
    kept = (f"the previous checkpoint {earlier[-1].name} is untouched: free space, then rerun with --resume"
            if earlier else "no earlier checkpoint exists")
    path = os_err.filename or tmp
    return CheckpointError(f"cannot write checkpoint {tmp.parent / tmp.name.replace('.tmp-', '')} "
                           f"({path}: {os_err.strerror or os_err}); {_human(free)} free on that disk; {kept}")


def save_checkpoint(run_dir: Path, step: int, model: Model, optimizer: Any,
                    trainer_state: dict[str, Any], model_config: ModelConfig, keep: int = 2,
                    is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Save on every rank (DCP is collective) and wait; rank 0 publishes it and applies retention
    (async_checkpoint.CheckpointSaver overlaps the writing with training instead)."""
    tmp, final = prepare_save(run_dir, step, is_main)
    barrier()
    state = state_to_save(model, optimizer)
    try:
        with quiet_dcp():
            dcp.save(state, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        failed = save_failed(err, tmp, is_main)
        if failed is err:
            raise
        raise failed from None
    barrier()
    if is_main:
        publish(tmp, final, step, trainer_state, model_config, keep)
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


def load_checkpoint(ckpt: Path, model: Model, optimizer: Any, verified: bool = False) -> dict[str, Any]:
    """Load model (and optimizer) state in place, whatever layout saved it; returns the trainer state.
    The checkpoint is verified first unless the caller just did (`verified`: it came from
    `intact_checkpoint` or `resolve_checkpoint`)."""
    ckpt = Path(ckpt)
    problem = None if verified else checkpoint_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} is corrupted ({problem}); delete it to use an older one")
    state_meta = read_trainer_state(ckpt)
    if not (ckpt / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: DCP .metadata is missing")
    parts = collect_state(model, optimizer, for_load=True)
    state = _merged(parts)
    try:
        reader = SafeReader(ckpt)
        with quiet_dcp():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded, it is corrupted or from another model "
                              f"({_reason(err)}); delete it to resume from an older one") from err
    apply_state(model, optimizer, parts, state)
    return state_meta


def resolve_checkpoint(path: Path, report: Report | None = to_stderr) -> Path:
    """A run directory (its newest intact checkpoint, see `intact_checkpoint`) or a checkpoint directory
    itself (verified: the user named it, so a damaged one is an error rather than a fallback)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / TRAINER_STATE).is_file() or has_manifest(path):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is corrupted ({problem}); give its run directory to "
                                  "use the newest intact checkpoint")
        return path
    ckpt = intact_checkpoint(path, report)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (expected {CHECKPOINTS}/step-N/)")
    return ckpt

"""Checkpoints: exact round trip, atomic publication under SIGKILL, clear errors for damaged ones."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cybertron.errors import CheckpointError
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cybertron.train.optim import build_optimizer

CFG = preset_config("debug", tie_embeddings=True)


def _trained(seed=0):
    model = build_model(CFG, seed=seed)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    model(torch.randint(0, 256, (2, 8))).float().logsumexp(-1).mean().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 3, model, opt, {"loader": {"samples_consumed": 24}}, CFG)
    model2 = build_model(CFG, seed=9)
    opt2 = build_optimizer(model2, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    state = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2)
    assert state["step"] == 3 and state["loader"]["samples_consumed"] == 24
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert model2.lm_head.weight is model2.embed_tokens.weight  # still tied after loading
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_retention_keeps_newest(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {}, CFG, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]


KILLED_SAVER = textwrap.dedent("""
    import sys, time, pathlib
    import torch
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config
    from cybertron.train import checkpoint
    run_dir = pathlib.Path(sys.argv[1])
    cfg = preset_config("debug", tie_embeddings=True)
    model = build_model(cfg, seed=0)
    checkpoint.save_checkpoint(run_dir, 1, model, None, {}, cfg)
    real_save = checkpoint.dcp.save
    def save_then_hang(*args, **kwargs):
        real_save(*args, **kwargs)          # the shard files are written ...
        (run_dir / "in-save").touch()
        time.sleep(60)                      # ... and the process dies before publishing
    checkpoint.dcp.save = save_then_hang
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    checkpoint.save_checkpoint(run_dir, 2, model, None, {}, cfg)
""")


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(tmp_path)])
    deadline = time.time() + 60
    while not (tmp_path / "in-save").exists():
        assert proc.poll() is None and time.time() < deadline, "saver died before reaching the save"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "checkpoints" / ".tmp-step-2").is_dir()  # the half-published one is there ...
    assert latest_checkpoint(tmp_path).name == "step-1"        # ... and ignored
    model = build_model(CFG, seed=5)
    load_checkpoint(latest_checkpoint(tmp_path), model, None)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    save_checkpoint(tmp_path, 2, model, None, {}, CFG)  # the next save replaces the leftover
    assert not (tmp_path / "checkpoints" / ".tmp-step-2").exists()


def test_corrupted_shard_is_a_clear_error(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {}, CFG)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, build_model(CFG), None)


def test_missing_trainer_state_is_a_clear_error(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {}, CFG)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        load_checkpoint(path, build_model(CFG), None)

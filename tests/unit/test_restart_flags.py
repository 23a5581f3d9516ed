"""`--max-restarts`: a launcher flag next to `--nproc`, and what a rank torchrun restarted does (resume from the
newest checkpoint, or start over when there is none). The restart itself: tests/distributed/test_restart.py."""

from __future__ import annotations

import pytest

from cybertron.cli import main as cli_main
from cybertron.config import TrainConfig
from cybertron.errors import ConfigError
from cybertron.parallel.runtime import DistEnv, pop_launcher_flag, resume_after_restart


def test_launcher_flags_leave_the_config_flags():
    assert pop_launcher_flag(["--steps", "3", "--max-restarts", "2", "--out", "r"], "--max-restarts", 0) == \
        (2, ["--steps", "3", "--out", "r"])
    assert pop_launcher_flag(["--max-restarts=0"], "--max-restarts", 0) == (0, [])
    with pytest.raises(ConfigError, match="--max-restarts expects a number of restarts"):
        pop_launcher_flag(["--max-restarts", "-1"], "--max-restarts", 0)


@pytest.mark.parametrize("command", ["train", "finetune", "align"])
def test_max_restarts_without_nproc_is_one_line(command, capsys):
    assert cli_main([command, "--max-restarts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-restarts restarts the ranks that --nproc N starts" in err[0], err


def test_torchrun_restart_count_is_read_from_its_environment():
    assert DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "3"}).restart_count == 3
    assert DistEnv.from_environ({}).restart_count == 0


def _config(run_dir) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.out = str(run_dir)
    return cfg


def test_a_restarted_rank_resumes_from_the_newest_checkpoint(tmp_path, capsys):
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config
    from cybertron.train import checkpoint as ckpt_io

    run_dir = tmp_path / "run"
    for restarts in (0, 1):  # no checkpoint yet: a restarted run starts over, like the first start
        cfg = _config(run_dir)
        resume_after_restart(cfg, DistEnv(restart_count=restarts))
        assert cfg.run.resume is False
    assert "no checkpoint yet, starting over" in capsys.readouterr().out

    model = build_model(preset_config("debug", vocab_size=300), seed=0)
    ckpt_io.save_checkpoint(run_dir, 2, model, None, {}, model.config)
    first, restarted = _config(run_dir), _config(run_dir)
    resume_after_restart(first, DistEnv(restart_count=0))
    resume_after_restart(restarted, DistEnv(restart_count=1))
    assert (first.run.resume, restarted.run.resume) == (False, True)
    assert f"restart 1: resuming from {run_dir / 'checkpoints' / 'step-2'}" in capsys.readouterr().out

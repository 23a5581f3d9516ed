"""`cybertron align` with ppo, rloo and reinforce++: the reward rises on the arithmetic task of
test_align_cli.py with generator and trainer log-probabilities asserted equal at every step (slow: a minute
or more each), and PPO's critic (value head + its AdamW state) is checkpointed with the policy, so a resumed
run repeats the uninterrupted one (by default: in-process, a tiny random model, a few seconds)."""

import json
import shutil

import pytest
import torch

from tests.conftest import read_metrics

pytest.importorskip("transformers")

from tests.e2e.test_align_cli import _cli, _grpo_args, arithmetic  # noqa: E402, F401  (the module fixture)
from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402


@pytest.mark.slow  # three CLI runs of 60 steps (GRPO's own runs by default in test_align_cli.py)
@pytest.mark.parametrize("method", ["ppo", "rloo", "reinforce++"])
def test_online_methods_raise_the_reward_with_generator_and_trainer_logprobs_equal(arithmetic, tmp_path, method):  # noqa: F811
    out = tmp_path / method
    result = _cli([*_grpo_args(arithmetic, out, "--steps", "60", "--align.check_logprobs", "true"),
                   "--method", method])
    assert result.returncode == 0, result.stderr  # check_logprobs asserted equality at every step
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    rewards = [r["reward"] for r in steps]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-20:]) / 20
    assert late > early + 0.15, (early, late)
    assert max(r["logprob_gap"] for r in steps) < 1e-5
    assert json.loads((out / "run.json").read_text())["align_method"] == method
    if method == "ppo":  # the critic (zero at first) learned the reward's level: the mean value tracks it
        values = sum(r["value"] for r in steps[-10:]) / 10
        assert abs(values - sum(rewards[-10:]) / 10) < 0.2 and values > 0.2, values


def _ppo_config(root, out):
    from cybertron.align.config import AlignConfig, validate

    cfg = AlignConfig()
    cfg.model.path, cfg.data.path, cfg.run.out = str(root / "hf"), str(root / "prompts.jsonl"), str(out)
    cfg.data.val_fraction = 0.0
    a = cfg.align
    a.method, a.reward, a.group_size, a.max_new_tokens = "ppo", f"{root / 'length.py'}:length", 2, 4
    a.updates_per_rollout, a.check_logprobs = 2, True  # two PPO epochs per rollout: old log-probs and values
    cfg.finetune.method = "lora"
    t = cfg.train
    t.steps, t.global_batch_size, t.dtype, t.lr = 4, 2, "fp32", 1e-2
    cfg.eval.every, cfg.checkpoint.every = 0, 2
    cfg.log.every, cfg.log.tensorboard, cfg.log.progress = 1, False, "lines"
    validate(cfg)
    return cfg


def test_ppo_resume_restores_the_critic_and_repeats_the_uninterrupted_run(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from cybertron.commands.align import run as run_align

    make_hf_dir(tmp_path / "hf")  # random: completions and their lengths vary, so advantages are not all 0
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                    for p in ("the cat", "a dog", "blue sky", "red sea")))
    (tmp_path / "length.py").write_text("def length(prompts, completions, **fields):\n"
                                        "    return [float(len(c)) / 10 for c in completions]\n")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_align(_ppo_config(tmp_path, full))
    keys = ("loss", "reward", "grad_norm", "value_loss", "value")
    expected = [[r[k] for k in keys] for r in read_metrics(full) if "loss" in r]
    assert len(expected) == 4 and any(r[3] > 0 for r in expected)
    saved = FileSystemReader(str(full / "checkpoints" / "step-2")).read_metadata().state_dict_metadata
    assert "model.value_head.weight" in saved and "optim.state.value_head.weight.exp_avg" in saved
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-4")  # as if killed after the step-2 checkpoint
    cfg = _ppo_config(tmp_path, cut)
    cfg.run.resume = True
    run_align(cfg)
    got = [[r[k] for k in keys] for r in read_metrics(cut) if "loss" in r]
    assert got == expected  # steps 3-4 need the restored value head (values, value loss) and its Adam moments
    assert torch.tensor(expected)[2:, 4].abs().sum() > 0  # the critic had moved away from its zero init


@pytest.mark.parametrize("flags, message", [
    (["--method", "ppo"], "error: align.reward (--reward) is required for ppo: FILE.py:FUNCTION or a reward-model "
                          "run directory"),
    (["--method", "ppo", "--reward", "r.py:f", "--align.gae_lambda", "1.5"],
     "error: align.gae_lambda must be in [0, 1], got 1.5"),
    (["--method", "reinforce++", "--reward", "r.py:f", "--align.gamma", "0"],
     "error: align.gamma must be in (0, 1], got 0.0"),
    (["--method", "ppo", "--reward", "r.py:f", "--align.vf_coef", "0"],
     "error: align.vf_coef must be > 0 (the value head learns from it), got 0.0"),
    (["--method", "ppo", "--reward", "r.py:f", "--nproc", "2", "--parallel.tp", "2", "--parallel.sequence_parallel",
      "false", "--parallel.loss_parallel", "false"],
     "error: ppo's value head reads whole hidden states, which tensor parallelism splits: use parallel.tp=1"),
])
def test_bad_online_config_is_one_line(tmp_path, capsys, flags, message):
    from cybertron.cli import main as cli_main

    args = ["align", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "r")]
    assert cli_main([*args, *flags]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "r").exists()

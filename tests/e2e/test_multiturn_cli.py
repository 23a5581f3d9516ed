"""`cybertron align --method grpo --align.environment ...` as a user runs it: an environment of the user's own
file drives several turns per episode through the CLI with generator and trainer log-probabilities asserted
equal at every step; a bad spec is one line."""

import json
import subprocess
import sys

import pytest

from tests.conftest import cli_env, read_metrics

pytest.importorskip("transformers")
pytest.importorskip("pydantic")

from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402

COMMON = ["--log.progress", "lines", "--log.tensorboard", "false", "--log.every", "1", "--eval.every", "0"]
ENVIRONMENT = '''
from cybertron.align.environments import EnvStep

class Chatty:
    """Answers every turn with a tool result; the third turn ends the episode, rewarded by its length."""
    tools = []

    def __init__(self):
        self.turns = 0

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, messages, turn):
        self.turns += 1
        if self.turns == 3:
            return EnvStep([], reward=len(turn.text) / 10, done=True)
        return EnvStep([{"role": "tool", "content": "result %d" % self.turns}])
'''


def _cli(args):
    return subprocess.run([sys.executable, "-m", "cybertron", *args], capture_output=True, text=True, env=cli_env(),
                          timeout=300)


@pytest.mark.slow  # CLI runs (about 10 s each); tests/unit/align/test_multiturn.py covers the pieces by default
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_multi_turn_grpo_from_the_cli(tmp_path, method):
    hf = make_hf_dir(tmp_path / "hf")
    (tmp_path / "env.py").write_text(ENVIRONMENT)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ("cat", "dog", "sky", "sea")))
    args = ["align", "--method", method, "--model", str(hf), "--data", str(prompts), "--weights", "full",
            "--train.dtype", "fp32", "--align.max_new_tokens", "6", "--align.max_turns", "4", "--data.seq_len",
            "128", "--train.global_batch_size", "2", "--align.group_size", "2", "--data.val_fraction", "0", *COMMON]
    result = _cli([*args, "--align.environment", f"{tmp_path / 'env.py'}:Chatty", "--steps", "2",
                   "--align.check_logprobs", "true", "--out", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr  # check_logprobs held at every step
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["turns"] == 3 and r["logprob_gap"] < 1e-5 and r["prefix_hit_share"] > 0.3 for r in steps)
    bad = _cli([*args, "--align.environment", f"{tmp_path / 'env.py'}:Nope", "--out", str(tmp_path / "bad")])
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: align.environment: {tmp_path / 'env.py'} defines no class 'Nope'"


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_turn_grpo_under_ddp_is_one_process(tmp_path):
    """Two ddp ranks each run the episodes of their share of the prompts, seeded by global position: the same
    rollouts, losses and rewards as one process. zero3 is refused before any process starts."""
    from cybertron.cli import main as cli_main
    from tests.distributed.test_train_cli_distributed import _run

    hf = make_hf_dir(tmp_path / "hf")
    (tmp_path / "env.py").write_text(ENVIRONMENT)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ("cat", "dog", "sky", "sea")))
    args = ["align", "--method", "grpo", "--model", str(hf), "--data", str(prompts), "--weights", "full",
            "--train.dtype", "fp32", "--align.max_new_tokens", "6", "--data.seq_len", "128", "--steps", "2",
            "--train.global_batch_size", "4", "--align.group_size", "2", "--data.val_fraction", "0",
            "--align.environment", f"{tmp_path / 'env.py'}:Chatty", "--align.check_logprobs", "true", *COMMON]
    _run([*args, "--out", str(tmp_path / "one")])
    _run([*args, "--out", str(tmp_path / "two")], torchrun=2)
    keys = ("loss", "grad_norm", "reward", "turns")
    one = [r[k] for r in read_metrics(tmp_path / "one") if "loss" in r for k in keys]
    two = [r[k] for r in read_metrics(tmp_path / "two") if "loss" in r for k in keys]
    assert len(one) == 2 * len(keys) and two == pytest.approx(one, rel=1e-5, abs=1e-6)
    assert cli_main([*args, "--out", str(tmp_path / "z"), "--nproc", "2", "--parallel.data_parallel", "zero3"]) == 2

"""`cybertron align` as a user runs it: GRPO on a verifiable task with a model pretrained by `cybertron train`,
DPO from a fine-tuning run, resumes that repeat the uninterrupted run, and bad input reported in one line."""

import json
import random
import shutil
import subprocess
import sys

import pytest

from tests.conftest import cli_env, read_metrics

pytest.importorskip("transformers")

from tests.unit.align.test_dpo import write_color_pairs  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir, write_chats  # noqa: E402

COMMON = ["--log.progress", "lines", "--log.tensorboard", "false", "--log.every", "1"]


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cybertron", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


def write_arithmetic(root):
    """Pretraining text of "a+b=c" lines whose answer is right only 40% of the time (else a random digit), the
    25 prompts "a+b=" with their answers, and a reward function checking the first line of a completion."""
    rng = random.Random(0)
    with (root / "arith.jsonl").open("w") as f:
        for _ in range(400):
            lines = []
            for _ in range(40):
                a, b = rng.randrange(5), rng.randrange(5)
                c = a + b if rng.random() < 0.4 else rng.randrange(9)
                lines.append(f"{a}+{b}={c}")
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    with (root / "prompts.jsonl").open("w") as f:
        for a in range(5):
            for b in range(5):
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    (root / "reward.py").write_text(
        "def correct(prompts, completions, answer, **fields):\n"
        "    return [1.0 if c.split('\\n')[0].strip() == a else 0.0 for c, a in zip(completions, answer)]\n"
        "def broken(prompts, completions, answer, **fields):\n"
        "    for c, a in zip(completions, answer):\n"
        "        if c.split('\\n')[0].strip() != a:\n"
        "            raise ValueError('cannot score a wrong answer')\n"
        "    return [1.0] * len(completions)\n"
        "def wordy(prompts, completions, **fields):\n"
        "    return ['good' if c.startswith('4') else 0.0 for c in completions]\n")


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """A debug-preset model pretrained by `cybertron train` on the arithmetic text (about 10 s)."""
    root = tmp_path_factory.mktemp("arith")
    write_arithmetic(root)
    result = _cli(["train", "--data.path", str(root / "arith.jsonl"), "--data.cache_dir", str(root / "cache"),
                   "--data.vocab_size", "300", "--data.seq_len", "64", "--model.preset", "debug", "--steps", "400",
                   "--train.global_batch_size", "16", "--train.lr", "3e-3", "--out", str(root / "base"),
                   "--eval.every", "0", *COMMON[:4], "--log.every", "100"])
    assert result.returncode == 0, result.stderr
    return root


def _grpo_args(root, out, *extra):
    return ["align", "--method", "grpo", "--model", str(root / "base"), "--data", str(root / "prompts.jsonl"),
            "--reward", f"{root / 'reward.py'}:correct", "--weights", "full", "--out", str(out),
            "--train.global_batch_size", "8", "--align.group_size", "8", "--align.max_new_tokens", "3",
            "--data.val_fraction", "0", "--train.dtype", "fp32", "--lr", "1e-3", *COMMON, *extra]


def test_grpo_raises_the_reward_with_generator_and_trainer_logprobs_equal(arithmetic, tmp_path):
    out = tmp_path / "grpo"
    result = _cli(_grpo_args(arithmetic, out, "--steps", "60", "--align.check_logprobs", "true"))
    assert result.returncode == 0, result.stderr  # check_logprobs asserted equality at every step
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    rewards = [r["reward"] for r in steps]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-20:]) / 20
    assert late > early + 0.15, (early, late)
    assert max(r["logprob_gap"] for r in steps) < 1e-5
    assert all(0 < r["generate_share"] < 1 and r["rollout_tokens_per_s"] > 0 for r in steps)
    assert json.loads((out / "run.json").read_text())["align_method"] == "grpo"


@pytest.mark.slow  # the session driver's bitwise resume is tested by default in tests/unit/train/test_session.py
def test_grpo_resume_repeats_the_uninterrupted_run(arithmetic, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ["--steps", "6", "--checkpoint.every", "3", "--align.updates_per_rollout", "3", "--weights", "lora"]
    assert _cli(_grpo_args(arithmetic, full, *extra)).returncode == 0
    assert _cli(_grpo_args(arithmetic, cut, *extra)).returncode == 0
    shutil.rmtree(cut / "checkpoints" / "step-6")  # as if killed after the step-3 checkpoint
    resumed = _cli(_grpo_args(arithmetic, cut, *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    keys = ("loss", "reward", "grad_norm", "kl")
    expected = [[r[k] for k in keys] for r in read_metrics(full) if "loss" in r]
    got = [[r[k] for k in keys] for r in read_metrics(cut) if "loss" in r]
    assert got == expected


@pytest.mark.slow  # three CLI runs; tests/unit/align/test_grpo.py checks the messages by default
def test_reward_function_failures_stop_the_run_naming_the_sample(arithmetic, tmp_path):
    broken = _cli(_grpo_args(arithmetic, tmp_path / "a", "--steps", "3", "--reward",
                             f"{arithmetic / 'reward.py'}:broken", "--align.max_new_tokens", "6"))
    assert broken.returncode == 2
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: step ") and "raised ValueError" in lines[0]
    assert "on sample" in lines[0] and "completion" in lines[0]
    wordy = _cli(_grpo_args(arithmetic, tmp_path / "b", "--steps", "3", "--reward",
                            f"{arithmetic / 'reward.py'}:wordy"))
    assert wordy.returncode == 2 and "returned 'good' (str) for sample" in wordy.stderr
    missing = _cli(["align", "--method", "grpo", "--model", str(arithmetic / "base"), "--data",
                    str(arithmetic / "prompts.jsonl"), "--out", str(tmp_path / "c")])
    assert missing.returncode == 2 and "align.reward (--reward) is required" in missing.stderr


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An SFT run of a tiny HF model: alignment usually starts from one."""
    root = tmp_path_factory.mktemp("sft")
    hf = make_hf_dir(root / "hf")
    result = _cli(["finetune", "--model", str(hf), "--data", str(write_chats(root / "chats.jsonl", 16)),
                   "--out", str(root / "run"), "--steps", "2", "--seq-len", "64", *COMMON])
    assert result.returncode == 0, result.stderr
    return root


def test_dpo_from_an_sft_run_resumes_exactly_and_generates(sft_run, tmp_path):
    prefs = write_color_pairs(tmp_path / "prefs.jsonl", 40, seed=5)
    args = ["align", "--method", "dpo", "--model", str(sft_run / "run"), "--data", str(prefs), "--steps", "8",
            "--checkpoint.every", "4", "--lr", "2e-3", "--train.global_batch_size", "4", "--eval.every", "0",
            *COMMON]
    full = _cli([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    assert "dpo with lora weights" in full.stdout
    assert _cli([*args, "--out", str(tmp_path / "cut")]).returncode == 0
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-8")
    assert _cli([*args, "--out", str(tmp_path / "cut"), "--resume"]).returncode == 0
    losses = lambda run: [(r["loss"], r["reward_margin"]) for r in read_metrics(run) if "loss" in r]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert losses(tmp_path / "full")[0][0] == pytest.approx(0.6931, abs=1e-3)
    gen = _cli(["generate", "--model", str(tmp_path / "full"), "--prompt", "the sky", "--max-new-tokens", "4",
                "--greedy"])
    assert gen.returncode == 0, gen.stderr  # adapters over an SFT run's merged weights, merged again


def test_bad_preference_data_is_one_line_with_its_location(sft_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " same", "rejected": " same"}) + "\n")
    result = _cli(["align", "--model", str(sft_run / "run"), "--data", str(bad), "--out", str(tmp_path / "r")])
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:1: 'chosen' and 'rejected' are identical, so the pair states " \
                                    "no preference"
    assert not (tmp_path / "r").exists()  # nothing written for a run that could not start


def test_grpo_stop_string_ends_completions(arithmetic, tmp_path):
    out = tmp_path / "stop"
    result = _cli(_grpo_args(arithmetic, out, "--steps", "2", "--align.max_new_tokens", "8", "--align.stop", "\\n"))
    assert result.returncode == 0, result.stderr
    steps = [r for r in read_metrics(out) if "loss" in r]
    # "a+b=" is answered by a digit and a newline: without the stop every completion would run to 8 tokens.
    assert all(r["completion_len"] < 4 and r["truncated"] < 0.5 for r in steps)
    import tomllib

    saved = tomllib.loads((out / "config.toml").read_text())["align"]["stop"]
    assert saved == "\\n"  # what was typed; the run decodes it (a TOML file may hold "\n" itself)

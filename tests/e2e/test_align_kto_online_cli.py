"""`cybertron align --method kto` and `--method online_dpo` as a user runs them: each raises the held-out win rate
on a task generated here (completions sampled for prompts never trained on, before and after training, judged
by the same reward), and bad KTO data is reported in one line naming the record."""

import json
import random
import subprocess
import sys

import pytest
import torch

from tests.conftest import cli_env, read_metrics

pytest.importorskip("transformers")

from cybertron.align.grpo import generate_rollouts  # noqa: E402
from cybertron.align.preference_data import PromptRecord, prompt_ids  # noqa: E402
from cybertron.data.tokenizer import TextTokenizer  # noqa: E402
from cybertron.models.hf import load_hf_model  # noqa: E402
from cybertron.runs import is_hf_dir, load_run  # noqa: E402
from cybertron.serve.engine import Engine  # noqa: E402
from tests.e2e.test_align_cli import COMMON, arithmetic  # noqa: E402, F401 - a fixture
from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402


def _cli(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "cybertron", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


def sample(path, prompts, samples, max_new_tokens, seed=11):
    """`samples` completions (temperature 1) per prompt from the model at `path` (a Hugging Face directory or a
    run directory, adapters merged) with cybertron's engine: texts, prompt-major."""
    if is_hf_dir(path):
        model, tokenizer = load_hf_model(path), TextTokenizer.load(path)
    else:
        run = load_run(path)
        model, tokenizer = run.model, run.tokenizer
    records = [PromptRecord(prompt_ids(tokenizer, p), p, {}, "held-out") for p in prompts]
    engine = Engine(model.eval(), tokenizer, max_batch_size=64, num_blocks=64 * 8, block_size=16, decode_graphs=False)
    with torch.no_grad():
        return [r.text for r in generate_rollouts(engine, records, samples, max_new_tokens, 1.0, 1.0, seed, step=0)]


def win_rate(before, after):
    """Share of paired samples (same prompt, same seed) where the trained policy's reward beats the initial one's;
    a tie counts one half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for b, a in zip(before, after)) / len(before)


def test_unlabeled_kto_record_is_one_line_with_its_location(tmp_path):
    hf = make_hf_dir(tmp_path / "hf")
    bad = tmp_path / "kto.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": " b", "label": True}) + "\n"
                   + json.dumps({"prompt": "c", "completion": " d"}) + "\n")
    result = _cli(["align", "--method", "kto", "--model", str(hf), "--data", str(bad), "--out", str(tmp_path / "r")])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {bad}:2: missing 'label'; a KTO record needs \"label\": true "
                                     "(desirable completion) or false (undesirable)")
    assert not (tmp_path / "r").exists()


EVEN = ("0", "2", "4", "6", "8")
REWARD = ("def even(prompts, completions, **fields):\n"
          "    return [1.0 if c.split('\\n')[0].strip() in ('0', '2', '4', '6', '8') else 0.0 for c in completions]\n")


def held_out_split(root, tmp_path):
    """20 of the 25 "a+b=" prompts to train on (train.jsonl), the other 5 held out; and the reward (even.py):
    1 for an even answer. The preference holds for any prompt, so what is learned on some shows on others (the
    correctness of a sum does not carry over from 20 prompts to 5 others in a model this small)."""
    records = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(records)
    train, held_out = records[:20], records[20:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "even.py").write_text(REWARD)
    return train, held_out


def held_out_win_rate(root, run_dir, held_out, samples=32):
    """(win rate of the trained policy's completions over the base's, base and trained mean reward) on the
    held-out prompts, `samples` paired samples each, judged as in training (an even answer on the first line)."""
    even = lambda texts: [float(t.split("\n")[0].strip() in EVEN) for t in texts]
    prompts = [r["prompt"] for r in held_out]
    before = even(sample(root / "base", prompts, samples, 3))
    after = even(sample(run_dir, prompts, samples, 3))
    return win_rate(before, after), sum(before) / len(before), sum(after) / len(after)


@pytest.mark.slow  # the arithmetic base (about 10 s, shared) and 30 steps
def test_kto_raises_the_held_out_win_rate(arithmetic, tmp_path):  # noqa: F811
    """Unpaired feedback on the 20 training prompts: each digit as the answer, desirable when even; held out: the
    other 5 prompts, 32 samples each."""
    train, held_out = held_out_split(arithmetic, tmp_path)
    with (tmp_path / "kto.jsonl").open("w") as f:
        for r in train:
            for d in range(9):
                f.write(json.dumps({"prompt": r["prompt"], "completion": f"{d}\n", "label": d % 2 == 0}) + "\n")
    out = tmp_path / "kto"
    result = _cli(["align", "--method", "kto", "--model", str(arithmetic / "base"), "--data",
                   str(tmp_path / "kto.jsonl"), "--weights", "full", "--out", str(out), "--steps", "30", "--lr",
                   "1e-3", "--train.global_batch_size", "30", "--data.val_fraction", "0.1", "--eval.every", "30",
                   *COMMON])
    assert result.returncode == 0, result.stderr
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert evals[0]["val_loss"] == pytest.approx(0.5, abs=1e-5)  # policy = reference, z_ref = 0: 1 - sigmoid(0)
    assert evals[-1]["val_loss"] < 0.45 and evals[-1]["val_label_accuracy"] > 0.8
    assert any(r["kl"] > 0 for r in read_metrics(out) if "loss" in r)  # z_ref was estimated, not only clamped
    rate, before, after = held_out_win_rate(arithmetic, out, held_out)
    assert rate > 0.62, (rate, before, after)


@pytest.mark.slow  # the arithmetic base (about 10 s, shared) and 30 rollout steps
def test_online_dpo_raises_the_held_out_win_rate(arithmetic, tmp_path):  # noqa: F811
    """Pairs sampled from the current policy for the 20 training prompts, judged by even.py; held out: the other
    5 prompts, 32 samples each. The generator's log-probabilities are asserted equal to the trainer's at every
    step (align.check_logprobs)."""
    train, held_out = held_out_split(arithmetic, tmp_path)
    out = tmp_path / "online"
    result = _cli(["align", "--method", "online_dpo", "--model", str(arithmetic / "base"), "--data",
                   str(tmp_path / "train.jsonl"), "--reward", f"{tmp_path / 'even.py'}:even", "--weights", "full",
                   "--out", str(out), "--train.global_batch_size", "20", "--align.max_new_tokens", "3",
                   "--align.stop", "\\n", "--data.val_fraction", "0", "--train.dtype", "fp32", "--lr", "1e-3",
                   "--steps", "30", "--align.check_logprobs", "true", *COMMON])
    assert result.returncode == 0, result.stderr
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert len(steps) == 30 and max(r["logprob_gap"] for r in steps) < 1e-5
    assert all(0 <= r["ties"] <= 1 and 0 < r["generate_share"] < 1 for r in steps)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference on its first pairs
    assert sum(r["reward"] for r in steps[-5:]) / 5 > steps[0]["reward"] + 0.2
    rate, before, after = held_out_win_rate(arithmetic, out, held_out)
    assert rate > 0.62, (rate, before, after)

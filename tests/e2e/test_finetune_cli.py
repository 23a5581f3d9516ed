"""`cybertron finetune` / `export` / `generate` as a user runs them: subprocesses on a tiny HF directory."""

import json
import shutil
import subprocess
import sys

import pytest

from cybertron.cli import main as cli_main
from cybertron.data.chat_template import DEFAULT_CHAT_TEMPLATE
from cybertron.data.tokenizer import TextTokenizer
from tests.conftest import cli_env, read_metrics

pytest.importorskip("transformers")

from cybertron.serve.chat import render_chat  # noqa: E402
from tests.unit.finetune.tiny_hf import WORDS, make_hf_dir, write_chats  # noqa: E402


def _cli(args):
    return subprocess.run([sys.executable, "-m", "cybertron", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return make_hf_dir(root / "hf", "llama"), write_chats(root / "chats.jsonl", n=32)


def _args(inputs, run_dir, *extra):
    hf, chats = inputs
    return ["finetune", "--model", str(hf), "--data", str(chats), "--out", str(run_dir), "--seq-len", "128",
            "--train.global_batch_size", "4", "--lr", "0.01", "--train.warmup_steps", "1", "--log.every", "1",
            "--log.progress", "lines", "--log.tensorboard", "false", *extra]


def test_lora_finetune_then_export_then_generate(inputs, tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(_args(inputs, run_dir, "--method", "lora", "--steps", "6"))
    assert result.returncode == 0, result.stderr
    assert "lora fine-tuning" in result.stdout and "checkpoint saved" in result.stdout
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert json.loads((run_dir / "run.json").read_text())["adapters"]["method"] == "lora"

    export = _cli(["export", "--run", str(run_dir), "--out", str(tmp_path / "hf"), "--merge"])
    assert export.returncode == 0, export.stderr
    gen = _cli(["generate", "--model", str(tmp_path / "hf"), "--prompt", "hello", "--max-new-tokens", "8",
                "--greedy"])
    assert gen.returncode == 0, gen.stderr  # (the tuned model may well stop at once: it learned short replies)
    # without --merge: a PEFT adapter directory, which generate takes as --model (merged onto its base on load)
    assert cli_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert cli_main(["generate", "--model", str(tmp_path / "peft"), "--prompt", "hello", "--max-new-tokens", "8",
                     "--greedy"]) == 0  # (its logits are checked against peft's in tests/parity/test_peft_format.py)


def test_full_finetune_run_dir_serves_generate(inputs, tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(_args(inputs, run_dir, "--method", "full", "--steps", "2", "--lr", "1e-4"))
    assert result.returncode == 0, result.stderr
    gen = _cli(["generate", "--model", str(run_dir), "--prompt", "hi", "--max-new-tokens", "5", "--greedy"])
    assert gen.returncode == 0, gen.stderr


def test_resume_repeats_the_same_losses(inputs, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(inputs, run_dir, "--method", "dora", "--steps", "6", "--checkpoint.every", "3",
                 "--eval.every", "0", "--finetune.dropout", "0.1")
    assert _cli(args).returncode == 0
    before = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    shutil.rmtree(run_dir / "checkpoints" / "step-6")
    resumed = _cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    after = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert after == before


def test_malformed_jsonl_line_is_one_clear_line_and_exit_2(inputs, tmp_path):
    chats = tmp_path / "chats.jsonl"
    lines = inputs[1].read_text().splitlines()
    lines[4] = lines[4][:-3]  # cut a record short on line 5
    chats.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    result = _cli(_args((inputs[0], chats), run_dir, "--steps", "2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "chats.jsonl:5: not valid JSON" in err[0], err
    assert not run_dir.exists()


def test_a_pretrained_run_finetunes_in_the_default_chat_format_that_export_carries(tmp_path):
    """`cybertron train` leaves a model without a chat template: finetune trains it in the default format
    (3 epochs by default), keeps that template in the run dir, and the exported directory renders chats in
    `transformers` exactly as serve renders them."""
    import random

    import transformers

    rng = random.Random(0)
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=40))}) + "\n" for _ in range(100)))
    logs = ["--log.progress", "lines", "--log.tensorboard", "false", "--log.every", "1"]
    assert cli_main(["train", "--data.path", str(corpus), "--data.cache_dir", str(tmp_path / "cache"),
                     "--data.vocab_size", "300", "--data.seq_len", "64", "--model.preset", "debug", "--steps", "1",
                     "--train.global_batch_size", "2", "--eval.every", "0", "--out", str(tmp_path / "A"), *logs]) == 0
    pairs = write_chats(tmp_path / "pairs.jsonl", n=12, fmt="prompt_response")
    run_dir = tmp_path / "F"
    result = _cli(["finetune", "--model", str(tmp_path / "A"), "--data", str(pairs), "--method", "lora",
                   "--out", str(run_dir), *logs])
    assert result.returncode == 0, result.stderr
    assert "chat format: cybertron's default" in result.stdout
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    rows = int(result.stdout.split(" train / ")[0].rsplit(" in ", 1)[1])  # "... in R train / V val rows"
    assert f"{len(losses)} steps = 3 epochs of {rows} rows" in result.stdout and len(losses) == 3
    assert (run_dir / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert TextTokenizer.load(run_dir).chat_template == DEFAULT_CHAT_TEMPLATE  # what generate/serve load

    assert cli_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "hf"), "--merge"]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = TextTokenizer.load(tmp_path / "hf")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sky"},
                {"role": "assistant", "content": "blue"}, {"role": "user", "content": "and the sea"}]
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(ours, messages)
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)

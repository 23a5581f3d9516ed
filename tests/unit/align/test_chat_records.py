"""Chat-message records through `cybertron align`: DPO pairs and GRPO prompts rendered by the model's own
template, and the reward function receiving the messages it was given."""

import json

import pytest

from cybertron.config import parse_args

pytest.importorskip("transformers")

from cybertron.align.config import AlignConfig, validate  # noqa: E402
from cybertron.commands.align import run as run_align  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402

COMMON = ["--log.progress=lines", "--log.tensorboard=false", "--log.every=1", "--data.val_fraction=0"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "chatml")


def _metrics(run):
    return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_on_chat_pairs_starts_at_ln2_and_learns(hf_dir, tmp_path):
    data = tmp_path / "chat_prefs.jsonl"
    with data.open("w") as f:
        for i in range(8):
            prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"what is {i}"}]
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "red blue green"}],
                                "rejected": "cat dog cat"}) + "\n")  # a string reply after chat is allowed
    cfg = parse_args([f"--model.path={hf_dir}", f"--data.path={data}", f"--run.out={tmp_path / 'run'}",
                      "--train.steps=6", "--train.lr=3e-3", "--train.global_batch_size=4", *COMMON], AlignConfig())
    validate(cfg)
    steps = [r for r in _metrics(run_align(cfg)) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["reward_margin"] > 0


def test_grpo_reward_function_sees_chat_prompts_and_fields(hf_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"say {i}"}], "want": str(i)}) + "\n")
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "reward.py").write_text(
        "import json\n"
        "def score(prompts, completions, want, **fields):\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'prompts': prompts, 'want': want}) + '\\n')\n"
        "    return [float(len(c)) for c in completions]\n")
    cfg = parse_args([f"--model.path={hf_dir}", f"--data.path={prompts}", f"--run.out={tmp_path / 'run'}",
                      "--align.method=grpo", f"--align.reward={tmp_path / 'reward.py'}:score", "--train.steps=2",
                      "--train.global_batch_size=2", "--align.group_size=3", "--align.max_new_tokens=4", *COMMON],
                     AlignConfig())
    validate(cfg)
    steps = [r for r in _metrics(run_align(cfg)) if "loss" in r]
    assert len(steps) == 2
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2 and len(calls[0]["prompts"]) == 6  # 2 prompts x 3 completions per call
    first = calls[0]["prompts"][0]
    assert first[0]["role"] == "user" and first[0]["content"].startswith("say ")
    assert calls[0]["want"][0] == first[0]["content"][-1]  # the record's other fields travel with it


def test_a_template_file_replaces_the_models_and_epochs_set_the_steps(hf_dir, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                        "{{ eos_token if m['role'] == 'assistant' else '\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    data = tmp_path / "chat_prefs.jsonl"
    with data.open("w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"what is {i}"}],
                                "chosen": "red blue", "rejected": "cat dog"}) + "\n")
    cfg = parse_args([f"--model.path={hf_dir}", f"--data.path={data}", f"--run.out={tmp_path / 'run'}",
                      "--train.epochs=2", "--train.global_batch_size=4", f"--data.chat_template={template}",
                      *COMMON], AlignConfig())
    validate(cfg)
    run = run_align(cfg)
    assert run.steps == 3 and len([r for r in _metrics(run) if "loss" in r]) == 3  # ceil(2 x 6 / 4)
    assert (run.run_dir / "chat_template.jinja").read_text() == template.read_text()
    row = run.task.setup.train["chosen_ids"][0]
    assert run.task.tokenizer.decode(row[:run.task.setup.train["chosen_len"][0]]).startswith("user: what is")

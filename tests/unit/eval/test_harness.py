"""lm_eval tasks through cybertron's model class: every loglikelihood (multiple choice, rolling) within 1e-4 of
lm_eval's own Hugging Face model (HFLM) on the same weights, the same generations (cybertron's engine, greedy,
with the task's stop sequences) and the same metrics. Offline: the tasks and data are local files."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from cybertron.commands.eval import main as eval_main  # noqa: E402
from cybertron.eval.harness import CybertronLM  # noqa: E402
from cybertron.runs import load_for_inference  # noqa: E402
from tests.unit.eval.local_tasks import TASKS, write_tasks  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def include_path(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm-eval"))


def evaluate(lm, include_path):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(include_path),
                                                                           include_defaults=False),
                           log_samples=True, bootstrap_iters=0, random_seed=None,
                           numpy_random_seed=None, torch_random_seed=None)


def responses(out, task):
    """Per document, in document order: the model's raw answers (a (logprob, greedy) per choice, a rolling
    log-likelihood, or a generation)."""
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow  # two full lm_eval runs, one through transformers (~15 s on 2 cores)
def test_loglikelihoods_generations_and_metrics_match_hflm(hf_dir, include_path):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, _ = load_for_inference(hf_dir, False, torch.device("cpu"))
    ours = evaluate(CybertronLM(model, tokenizer, batch_size=4), include_path)
    theirs = evaluate(HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=4), include_path)
    for task in ("tiny_mc", "tiny_rolling"):
        got, want = responses(ours, task), responses(theirs, task)
        flat = lambda r: [x for doc in r for choice in doc for x in (choice[0] if isinstance(choice[0], (list, tuple))  # noqa: E731
                                                                      else choice)]
        assert flat(got) == pytest.approx(flat(want), abs=1e-4), task
    generations = responses(ours, "tiny_gen")
    assert generations == responses(theirs, "tiny_gen")
    assert any(g[0][0] for g in generations)  # something was generated (the stops do not cut everything)
    for task in TASKS:
        for metric, value in theirs["results"][task].items():
            if metric != "alias":
                assert ours["results"][task][metric] == pytest.approx(value, abs=1e-6), (task, metric)


def reference_accuracy(hf_dir, records):
    """Multiple-choice accuracy from transformers' logits: the choice (after lm_eval's " " delimiter) with the
    highest summed log-probability given the question, split into tokens as lm_eval does (whole minus context)."""
    import transformers

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    correct = 0
    for r in records:
        context = tok(r["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in r["choices"]:
            whole = tok(r["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    return correct / len(records)


def test_cli_task_accuracy_matches_transformers(hf_dir, include_path, tmp_path, capsys):
    out = tmp_path / "results"
    assert eval_main([str(hf_dir), "--tasks", "tiny_mc,tiny_gen", "--include-path", str(include_path),
                      "--eval.builtin_tasks=false", "--limit", "4", "--out", str(out), "--name", "tasks"]) == 0
    record = json.loads((out / "tasks.json").read_text())
    results = record["lm_eval"]["results"]
    assert set(results) == {"tiny_mc", "tiny_gen"}
    assert record["lm_eval"]["n-samples"]["tiny_mc"]["effective"] == 4
    records = [json.loads(line) for line in (include_path / "mc.jsonl").read_text().splitlines()][:4]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(reference_accuracy(hf_dir, records))
    assert "exact_match,none" in results["tiny_gen"]
    assert record["config"]["eval"]["tasks"] == "tiny_mc,tiny_gen"
    assert "tiny_mc acc:" in capsys.readouterr().out

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


def hf_model(hf_dir):
    import transformers

    return (transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir),
            transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval())


@torch.no_grad()
def test_requests_match_transformers(hf_dir):
    """The three request types on their own, against transformers: loglikelihood (context split as lm_eval
    splits it: the whole text's tokens after the context's), loglikelihood_rolling of a short text (every token
    given the prefix token) and generate_until (transformers' greedy generate, cut at the stop sequence)."""
    from types import SimpleNamespace as Request

    tok, ref = hf_model(hf_dir)
    model, tokenizer, _ = load_for_inference(hf_dir, False, torch.device("cpu"))
    lm = CybertronLM(model, tokenizer, batch_size=2)
    pairs = [("the cat sat", " on the mat"), ("hello", " hi"), ("what is the color of", " the sky please")]
    got = lm.loglikelihood([Request(args=pair) for pair in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        n = len(tok(context)["input_ids"])
        whole = tok(context + continuation)["input_ids"]
        logprobs = ref(torch.tensor([whole])).logits[0].log_softmax(-1)
        targets = torch.tensor(whole[n:])
        assert logprob == pytest.approx(logprobs[n - 1:-1].gather(-1, targets[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logprobs[n - 1:-1].argmax(-1) == targets).all())
    text = "one two three red blue green"
    ids = [tok.eos_token_id] + tok(text)["input_ids"]  # no bos in this tokenizer: the prefix is eos, as in HFLM
    expected = ref(torch.tensor([ids])).logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])
    (rolling,) = lm.loglikelihood_rolling([Request(args=(text,))], disable_tqdm=True)
    assert rolling == pytest.approx(expected.sum().item(), abs=1e-4)
    prompts = ["tell me a story about", "the sky is"]
    outs = lm.generate_until([Request(args=(p, {"until": [" dog"], "max_gen_toks": 10})) for p in prompts])
    assert all(outs)  # something to compare
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        generated = ref.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert out == tok.decode(generated, skip_special_tokens=True).split(" dog")[0]


def reference_accuracy(hf_dir, records):
    """Multiple-choice accuracy from transformers' logits: the choice (after lm_eval's " " delimiter) with the
    highest summed log-probability given the question, split into tokens as lm_eval does (whole minus context)."""
    tok, model = hf_model(hf_dir)
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


def test_num_fewshot_reaches_the_tasks(include_path):
    from cybertron.eval.tasks import TaskRequest, load_tasks

    loaded = load_tasks(TaskRequest(["tiny_mc", "tiny_gen"], num_fewshot=2, include_path=str(include_path),
                                    builtin_tasks=False, seed=7))
    assert {name: task.get_config("num_fewshot") for name, task in loaded["tasks"].items()} == \
        {"tiny_mc": 2, "tiny_gen": 2}
    default = load_tasks(TaskRequest(["tiny_mc"], include_path=str(include_path), builtin_tasks=False))
    assert default["tasks"]["tiny_mc"].get_config("num_fewshot") == 0

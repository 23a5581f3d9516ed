"""Three lm_eval tasks on local JSON Lines files, written into a test's folder (no network): multiple choice,
generate_until with a stop sequence, and loglikelihood_rolling (perplexity of documents)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.unit.finetune.tiny_hf import WORDS

TASKS = ["tiny_mc", "tiny_gen", "tiny_rolling"]


def _yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def _metric(name: str) -> str:
    return f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n"


def write_tasks(root: Path, n: int = 6) -> Path:
    """root/tasks/*.yaml and their data; returns the folder to give as include_path."""
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    records = {
        "mc": [{"question": f"{words(4)} is", "choices": [words(1) for _ in range(3)], "answer": i % 3}
               for i in range(n)],
        "gen": [{"prompt": f"{words(5)}:", "target": f" {words(2)}"} for _ in range(n)],
        "rolling": [{"text": words(12 + 3 * i)} for i in range(n)],
    }
    for name, rows in records.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(_yaml("tiny_mc", tasks / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n" + _metric("acc") + _metric("acc_norm"))))
    (tasks / "tiny_gen.yaml").write_text(_yaml("tiny_gen", tasks / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: [' sky', '\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n" + _metric("exact_match"))))
    (tasks / "tiny_rolling.yaml").write_text(_yaml("tiny_rolling", tasks / "rolling.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")))
    return tasks

"""A tiny random Hugging Face model (made by transformers) and two text files, shared by the eval tests."""

import json
import random

import pytest

pytest.importorskip("transformers")

from tests.unit.finetune.tiny_hf import WORDS, make_hf_dir  # noqa: E402


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("eval-hf") / "model")


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """A plain text file (one document) and a .jsonl file (three documents)."""
    root = tmp_path_factory.mktemp("eval-text")
    rng = random.Random(0)
    sentence = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    plain = root / "story.txt"
    plain.write_text(sentence(30) + ".\n" + sentence(25) + "\n")
    lines = root / "docs.jsonl"
    lines.write_text("".join(json.dumps({"text": sentence(8 + 4 * i)}) + "\n" for i in range(3)))
    return [plain, lines]

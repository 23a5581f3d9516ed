"""Shared fixtures for the serving tests: a random debug-shaped model and a tiny byte-level BPE tokenizer."""

import pytest

from cybertron.data.tokenizer import train_bpe_tokenizer
from cybertron.models.hf import save_hf_model
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello world! This is a tiny corpus for a tiny tokenizer.\n\nIt has two paragraphs. " * 3,
    "def add(a, b):\n    return a + b\n" * 4,
]


@pytest.fixture(scope="session")
def debug_model():
    """The `debug` preset (vocab 256, context 256) with random weights, for token-level tests."""
    return build_model(preset_config("debug"), seed=0).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="session")
def text_model(tokenizer):
    """A debug-shaped model whose vocabulary is the tokenizer's, for text-level tests."""
    return build_model(preset_config("debug", vocab_size=tokenizer.vocab_size), seed=1).eval()


@pytest.fixture(scope="module")
def hf_dir(text_model, tokenizer, tmp_path_factory):
    """text_model and its tokenizer saved as a Hugging Face directory (what the CLI loads)."""
    out = tmp_path_factory.mktemp("hf")
    save_hf_model(text_model.state_dict(), text_model.config, out)
    tokenizer.save(out)
    return out

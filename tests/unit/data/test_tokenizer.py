import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cybertron.data.tokenizer import IncrementalDecoder, TextTokenizer, train_bpe_tokenizer
from cybertron.errors import DataError

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n\tprint(i)  # count\n",
    "The quick brown fox jumps over the lazy dog.\n",
] * 20
TRICKY_TEXTS = [
    "",
    "    indented\n\n\n\t\ttabs  \r\n trailing   ",
    "héllo wörld — “quotes” 中文字符 🙂 👍🏽 e\u0301 \u200d \x00 end",
    "<|endoftext|> looks special",
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}\n",
]


def random_text(rng: random.Random, length: int) -> str:
    # ASCII, control whitespace, Latin accents, CJK, emoji (4-byte UTF-8), private use.
    pools = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x4E00, 0x4FFF), (0x1F300, 0x1F6FF),
             (0xE000, 0xE0FF)]
    chars = []
    for _ in range(length):
        low, high = rng.choice(pools)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


def build_llama3_style(tmp_path):
    """Byte-level BPE with a split regex, bos added by the post-processor, eos named by tokenizer_config."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    directory = tmp_path / "llama3"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True},
              "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory, tokenizer


def build_sentencepiece_style(tmp_path):
    """Metaspace BPE (Llama-2 / Mistral style) saved as a bare tokenizer.json without any config."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    file = tmp_path / "sp.json"
    tokenizer.save(str(file))
    return file, tokenizer


def test_trained_bpe_round_trips_any_text(bpe):
    rng = random.Random(0)
    texts = TRICKY_TEXTS + [random_text(rng, rng.randint(1, 80)) for _ in range(200)]
    for text in texts:
        assert bpe.decode(bpe.encode(text)) == text
    assert [bpe.decode(ids) for ids in bpe.encode_batch(texts)] == texts


def test_trained_bpe_has_endoftext_as_id_zero_eos(bpe):
    assert bpe.eos_id == 0
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    assert bpe.bos_id is None and bpe.pad_id is None
    assert 257 < bpe.vocab_size <= 400  # a tiny corpus can run out of merges before 400
    assert len(bpe.encode("def add(a, b):")) < len("def add(a, b):")  # merges were learned


def test_encode_batch_equals_encode(bpe):
    assert bpe.encode_batch(CORPUS[:4]) == [bpe.encode(text) for text in CORPUS[:4]]


def test_decode_accepts_numpy_and_torch_ids(bpe):
    ids = bpe.encode(CORPUS[1])
    assert bpe.decode(np.asarray(ids, dtype=np.uint16)) == CORPUS[1]
    assert bpe.decode(torch.tensor(ids)) == CORPUS[1]


def test_vocab_size_below_byte_alphabet_is_rejected():
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


@pytest.mark.parametrize("target", ["directory", "file.json"])
def test_save_then_load_gives_the_same_tokenizer(bpe, tmp_path, target):
    path = tmp_path / target
    saved = bpe.save(path)
    assert saved.name in ("tokenizer.json", "file.json") and saved.is_file()
    loaded = TextTokenizer.load(path)
    assert loaded.content_hash() == bpe.content_hash()
    assert loaded.eos_id == bpe.eos_id and loaded.vocab_size == bpe.vocab_size
    assert loaded.encode(TRICKY_TEXTS[2]) == bpe.encode(TRICKY_TEXTS[2])


def test_llama3_style_directory_loads_config_tokens_and_chat_template(tmp_path):
    directory, raw = build_llama3_style(tmp_path)
    tok = TextTokenizer.load(directory)
    assert tok.eos_id == raw.token_to_id("<|eot_id|>")
    assert tok.bos_id == raw.token_to_id("<|begin_of_text|>")
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    text = "print(12345)  # héllo"
    assert tok.encode(text, add_special_tokens=True)[0] == tok.bos_id
    assert tok.bos_id not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert TextTokenizer.load(directory / "tokenizer.json").eos_id == tok.eos_id  # config beside the file


def test_sentencepiece_style_file_finds_eos_and_bos_by_common_names(tmp_path):
    file, raw = build_sentencepiece_style(tmp_path)
    tok = TextTokenizer.load(file)
    assert tok.eos_id == raw.token_to_id("</s>")
    assert tok.bos_id == raw.token_to_id("<s>")
    assert tok.chat_template is None
    assert tok.decode(tok.encode("def add(a, b): return a")) == "def add(a, b): return a"


def test_chat_template_in_list_form_picks_default(tmp_path, bpe):
    bpe.save(tmp_path)
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config = {"eos_token": "<|endoftext|>", "chat_template": templates}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert TextTokenizer.load(tmp_path).chat_template == "D"


def test_invalid_tokenizer_file_is_a_data_error(tmp_path):
    file = tmp_path / "tokenizer.json"
    file.write_text('{"not": "a tokenizer"}', encoding="utf-8")
    with pytest.raises(DataError, match="is not a valid Hugging Face tokenizer.json"):
        TextTokenizer.load(file)
    with pytest.raises(DataError, match="has no tokenizer.json"):
        TextTokenizer.load(tmp_path / "empty_dir")


def test_tokenizer_without_any_eos_is_a_data_error(tmp_path):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=100, show_progress=False))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="has no end-of-text token"):
        TextTokenizer.load(tmp_path)


def test_config_eos_missing_from_vocab_is_a_data_error(tmp_path, bpe):
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}', encoding="utf-8")
    with pytest.raises(DataError, match="no token '<|nope|>'"):
        TextTokenizer.load(tmp_path)


def test_incremental_decoder_waits_for_a_complete_character():
    ascii_only = train_bpe_tokenizer(["abc def " * 50], vocab_size=300)
    ids = ascii_only.encode("🙂")
    assert len(ids) == 4  # one token per UTF-8 byte: the BPE never saw this character
    decoder = IncrementalDecoder(ascii_only)
    assert [decoder.push(i) for i in ids] == ["", "", "", "🙂"]


def test_incremental_decoder_flush_returns_an_incomplete_tail(bpe):
    decoder = IncrementalDecoder(bpe)
    ids = bpe.encode("ok 🙂")
    pushed = "".join(decoder.push(i) for i in ids[:-1])
    assert pushed + decoder.flush() == bpe.decode(ids[:-1])


def test_incremental_decoder_concatenation_equals_decode(bpe, tmp_path):
    sentencepiece = TextTokenizer.load(build_sentencepiece_style(tmp_path)[0])
    rng = random.Random(1)
    for tok in (bpe, sentencepiece):
        texts = TRICKY_TEXTS + CORPUS[:4] + [random_text(rng, 40) for _ in range(30)]
        for text in texts:
            ids = tok.encode(text)
            decoder = IncrementalDecoder(tok)
            streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
            assert streamed == tok.decode(ids)


def test_word_cutter_cuts_only_overlong_runs_and_loses_no_text():
    from cybertron.data.tokenizer import WordCutter

    cutter = WordCutter(4)
    documents = ["ab abcdefghij x", "abcd", "tail"]
    pieces = list(cutter(documents))
    assert pieces == ["ab abcd", "efgh", "ij x", "abcd", "tail"]
    assert "".join(pieces) == "".join(documents) and (cutter.runs, cutter.longest) == (1, 10)
    assert "1 run(s) of more than 4 characters" in cutter.note()


def test_a_huge_line_without_whitespace_trains_in_bounded_time():
    """One word of 200,000 repeated characters took 16 s to train on before words were cut (the BPE trainer's
    work grows faster than a word's length); cut, it is as quick as ordinary text."""
    import time

    from cybertron.data.tokenizer import WordCutter

    cutter = WordCutter()
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x\n", "a" * 200_000], vocab_size=300, cutter=cutter)
    assert time.perf_counter() - start < 5 and cutter.runs == 1
    assert tokenizer.decode(tokenizer.encode("a" * 5000)) == "a" * 5000


def test_text_without_overlong_words_trains_the_same_tokenizer_as_before():
    """The cut changes nothing for ordinary text: the same tokenizer as training on it uncut."""
    import sysconfig
    from pathlib import Path

    from cybertron.data.tokenizer import WordCutter

    documents = [*CORPUS, (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()]
    cut = train_bpe_tokenizer(documents, vocab_size=600)
    uncut = train_bpe_tokenizer(documents, vocab_size=600, cutter=WordCutter(10**9))
    assert cut.backend.to_str() == uncut.backend.to_str()

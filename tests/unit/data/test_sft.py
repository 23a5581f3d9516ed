"""SFT data: chat templates render the examples, only assistant tokens carry loss, and packing several
examples into a row changes no token's loss."""

import json

import pytest
import torch

from cybertron.data.sft import (
    IGNORE_INDEX,
    RowLoader,
    build_sft_data,
    pack_examples,
    read_conversations,
    tokenize_conversation,
    tokenize_examples,
)
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError
from cybertron.models.config import ModelConfig
from cybertron.models.llama import build_model
from cybertron.train.losses import cross_entropy_sum
from tests.unit.finetune.tiny_hf import CHATML, LLAMA3, VOCAB, write_chats, write_tokenizer


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tokenizer(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    write_tokenizer(out, CHATML if request.param == "chatml" else LLAMA3)
    return TextTokenizer.load(out)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl", n=24)


def test_prompt_tokens_are_masked(tokenizer, chats):
    end_of_turn = tokenizer.eos_token  # <|im_end|> for ChatML, <|eot_id|> for Llama 3
    for messages in read_conversations(chats):
        ex = tokenize_conversation(tokenizer, messages)
        targets = [label for label in ex.labels if label != IGNORE_INDEX]
        # Reference: the assistant turns alone, each with its end-of-turn marker (ChatML adds a newline).
        expected = "".join(m["content"] + end_of_turn + ("\n" if end_of_turn == "<|im_end|>" else "")
                           for m in messages if m["role"] == "assistant")
        assert tokenizer.decode(targets) == expected
        # every other token, i.e. every prompt token (system, user, role headers, bos), is masked
        full = ex.inputs + [ex.labels[-1]]
        assert len(full) - 1 - len(targets) == sum(label == IGNORE_INDEX for label in ex.labels)
        assert all(label == IGNORE_INDEX or label == full[i + 1] for i, label in enumerate(ex.labels))
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] not in tokenizer.decode(targets)


def test_prompt_response_pairs_render_as_one_exchange(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "what color is the sky", "response": "blue"}) + "\n")
    [messages] = read_conversations(path)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    ex = tokenize_conversation(tokenizer, messages)
    assert tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]).startswith("blue")


def test_packing_restarts_positions_per_example(tokenizer, chats):
    examples, _ = tokenize_examples(tokenizer, read_conversations(chats), 128)
    rows = pack_examples(examples, 128, pad_id=0)
    assert rows["inputs"].shape[0] < len(examples)  # several examples share a row
    assert (rows["positions"] == 0).sum().item() >= len(examples)  # each example (and each pad) restarts
    first, second = examples[0], examples[1]
    assert rows["positions"][0, :len(first)].tolist() == list(range(len(first)))
    assert rows["positions"][0, len(first):len(first) + len(second)].tolist() == list(range(len(second)))


def test_packed_loss_equals_unpacked_loss(tokenizer, chats):
    examples, _ = tokenize_examples(tokenizer, read_conversations(chats), 96)
    packed = pack_examples(examples, 96, pad_id=0, pack=True)
    single = pack_examples(examples, 96, pad_id=0, pack=False)
    assert packed["inputs"].shape[0] < single["inputs"].shape[0] == len(examples)
    model = build_model(ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96),
                        seed=0).eval()

    def token_losses(rows, positions=True):
        with torch.no_grad():
            logits = model(rows["inputs"], positions=rows["positions"] if positions else None)
        keep = rows["labels"] != IGNORE_INDEX
        return torch.nn.functional.cross_entropy(logits[keep], rows["labels"][keep], reduction="none")

    packed_losses, single_losses = token_losses(packed), token_losses(single)
    # rows hold the examples in the same order, so the loss tokens line up one to one
    assert packed_losses.shape == single_losses.shape
    assert (packed_losses - single_losses).abs().max() <= 1e-4
    assert abs(cross_entropy_sum(model(packed["inputs"], positions=packed["positions"]), packed["labels"])
               - single_losses.sum()) <= 1e-5 * single_losses.sum()
    # reference check on the reference: without restarting positions (attention across examples) they differ
    assert (token_losses(packed, positions=False) - single_losses).abs().max() > 1e-3


@pytest.mark.parametrize("line, fragment", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"text": "plain"}', "expected 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
    ('{"prompt": "caf\xe9", "response": "b"}', "not UTF-8"),  # written as Latin-1 below
])
def test_malformed_line_is_reported_with_its_number(tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "response": "b"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="latin-1")
    with pytest.raises(DataError, match=fragment) as err:
        read_conversations(path)
    assert "bad.jsonl:3:" in str(err.value)


def test_template_rejecting_a_conversation_names_its_line(tmp_path):
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
              "{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}")
    write_tokenizer(tmp_path, template=strict)
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "yes"}) + "\n" + json.dumps(
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n")
    with pytest.raises(DataError, match="chats.jsonl:2: .*roles must alternate"):
        build_sft_data(path, TextTokenizer.load(tmp_path), 64, val_fraction=0.0, seed=0)


def test_missing_chat_template_is_a_data_error(tmp_path, chats):
    write_tokenizer(tmp_path, template=None)
    with pytest.raises(DataError, match="no chat template"):
        tokenize_conversation(TextTokenizer.load(tmp_path), read_conversations(chats)[0])


def test_long_examples_are_cut_and_split_is_deterministic(tokenizer, chats):
    a = build_sft_data(chats, tokenizer, 40, val_fraction=0.25, seed=0)
    b = build_sft_data(chats, tokenizer, 40, val_fraction=0.25, seed=0)
    assert a.n_truncated > 0 and a.val is not None
    assert torch.equal(a.train["inputs"], b.train["inputs"]) and torch.equal(a.val["labels"], b.val["labels"])


def test_row_loader_resumes_at_the_same_batch(tokenizer, chats):
    rows = build_sft_data(chats, tokenizer, 64, val_fraction=0.0, seed=0).train
    loader = RowLoader(rows, batch_size=3, seed=1)
    for _ in range(5):
        loader.next_batch()
    state, expected = loader.state_dict(), loader.next_batch()
    again = RowLoader(rows, batch_size=3, seed=7)
    again.load_state_dict(state)
    got = again.next_batch()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

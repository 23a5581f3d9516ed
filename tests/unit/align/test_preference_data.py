"""Preference and prompt records -> token ids and response masks, and the errors bad records give."""

import json

import pytest

from cybertron.align.preference_data import (
    TokenizedSequence,
    build_preference_data,
    read_preference_pairs,
    read_prompts,
    tokenize_sequence,
    trim_batch,
    truncate,
)
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError

pytest.importorskip("transformers")

from tests.unit.finetune.tiny_hf import CHATML, write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, CHATML)
    return TextTokenizer.load(out)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plain_text_is_prompt_then_response_then_eos(tokenizer):
    seq = tokenize_sequence(tokenizer, "the cat sat", " on the mat")
    prompt, response = tokenizer.encode("the cat sat"), tokenizer.encode(" on the mat")
    assert seq.ids == prompt + response + [tokenizer.eos_id]
    assert seq.mask == [False] * len(prompt) + [True] * (len(response) + 1)


def test_chat_masks_only_the_final_reply_and_its_end_of_turn(tokenizer):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "what is the color of the sky"}]
    seq = tokenize_sequence(tokenizer, prompt, [{"role": "assistant", "content": "blue"}])
    scored = tokenizer.decode([t for t, m in zip(seq.ids, seq.mask) if m])
    assert scored == "blue<|im_end|>\n"  # the earlier assistant turn "hello" is prompt, not response
    rendered = tokenizer.decode(seq.ids)
    assert rendered.endswith("<|im_start|>assistant\nblue<|im_end|>\n")


def test_truncation_keeps_the_prompt_end_and_cuts_the_response():
    seq = TokenizedSequence(list(range(10)), [False] * 6 + [True] * 4)
    cut = truncate(seq, 6)
    # The response alone (4) is under the budget's half guarantee (3): prompt keeps max(6-4, 3) = 3 tokens.
    assert cut.ids == [3, 4, 5, 6, 7, 8] and cut.mask == [False] * 3 + [True] * 3
    assert truncate(seq, 20) is seq


def test_pairs_become_padded_rows_trimmed_per_batch(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "the cat", "chosen": " sat", "rejected": " red blue green"},
                                         {"prompt": "a", "chosen": " yes", "rejected": " no"}])
    data = build_preference_data(path, tokenizer, 64, 0.0, seed=0)
    rows = data.train
    assert data.n_pairs == 2 and data.val is None
    assert rows["chosen_ids"].shape == rows["rejected_ids"].shape  # one width: both sides in one forward
    longest = int(max(rows["chosen_len"].max(), rows["rejected_len"].max()))
    assert rows["chosen_ids"].shape[1] == longest
    short = trim_batch({k: v[1:] for k, v in rows.items()})
    assert short["chosen_ids"].shape[1] == int(max(short["chosen_len"][0], short["rejected_len"][0]))


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, "identical"),
    ({"prompt": "", "chosen": " b", "rejected": " c"}, "'prompt' is empty"),
    ({"prompt": "a", "chosen": "  ", "rejected": " c"}, "'chosen' is empty"),
    ({"prompt": "a", "chosen": " b"}, "missing 'rejected'"),
    ({"chosen": " b", "rejected": " c"}, "missing 'prompt'"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": " c"}, "plain text"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": "c"}, "assistant messages only"),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, "'prompt' must be"),
])
def test_bad_records_name_file_line_and_problem(tokenizer, tmp_path, record, fragment):
    good = {"prompt": "x", "chosen": " y", "rejected": " z"}
    path = _write(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataError, match=fragment) as err:
        read_preference_pairs(path, tokenizer, 64)
    assert f"{path}:2" in str(err.value)


def test_unreadable_files(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_preference_pairs(tmp_path / "missing.jsonl", tokenizer, 64)
    (tmp_path / "j.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    with pytest.raises(DataError, match=r"j.jsonl:2: not valid JSON"):
        read_preference_pairs(tmp_path / "j.jsonl", tokenizer, 64)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        read_preference_pairs(tmp_path / "e.jsonl", tokenizer, 64)


def test_prompts_keep_their_fields_and_skip_prompts_that_leave_no_room(tokenizer, tmp_path):
    path = _write(tmp_path / "q.jsonl", [{"prompt": "the cat", "answer": "4", "id": 7},
                                         {"prompt": " ".join(["dog"] * 40)}])
    records, skipped = read_prompts(path, tokenizer, max_prompt_len=10)
    assert skipped == 1 and len(records) == 1
    assert records[0].ids == tokenizer.encode("the cat") and records[0].fields == {"answer": "4", "id": 7}
    with pytest.raises(DataError, match="holds no prompt of at most 1 tokens"):
        read_prompts(path, tokenizer, max_prompt_len=1)

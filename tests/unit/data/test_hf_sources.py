"""Hugging Face `datasets` as a source: save_to_disk folders, local files through load_dataset, streaming,
and a Hub name that fails in one line without network. The reference is the records as written."""

import json

import pytest

datasets = pytest.importorskip("datasets")

from cybertron.align.preference_data import read_jsonl  # noqa: E402
from cybertron.data.hf import HFOptions  # noqa: E402
from cybertron.data.sft import read_conversations  # noqa: E402
from cybertron.data.sources import fingerprint_source, iter_documents  # noqa: E402
from cybertron.errors import DataError  # noqa: E402

TEXTS = [f"document {i}: " + "word " * (i % 7) for i in range(23)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict (train/test) written by save_to_disk."""
    root = tmp_path_factory.mktemp("saved")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(23))}),
                                   "test": datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})})
    splits.save_to_disk(str(root / "dd"))
    splits["train"].save_to_disk(str(root / "ds"))
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_a_saved_dataset_reads_its_split_in_order(saved, streaming):
    options = HFOptions(streaming=streaming)
    assert list(iter_documents(str(saved / "ds"), "text", options)) == TEXTS
    assert list(iter_documents(f"hf:{saved / 'dd'}", "text", options)) == TEXTS
    assert list(iter_documents(str(saved / "dd"), "text", HFOptions("test", streaming=streaming))) == ["held out"]


def test_local_files_go_through_load_dataset(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[:10]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[10:]))
    assert list(iter_documents(f"hf:{tmp_path}/*.jsonl", "body")) == TEXTS
    datasets.Dataset.from_dict({"body": TEXTS}).to_csv(str(tmp_path / "c.csv"))
    assert list(iter_documents(f"hf:{tmp_path / 'c.csv'}", "body", HFOptions(streaming=True))) == TEXTS


def test_a_missing_split_or_field_is_one_line_naming_it(saved):
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are \['test', 'train'\]"):
        list(iter_documents(str(saved / "dd"), "text", HFOptions("validation")))
    with pytest.raises(DataError, match=r"ds record 0 has no string field 'body' \(its fields: \['n', 'text'\]\)"):
        list(iter_documents(str(saved / "ds"), "body"))


def test_a_hub_name_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hf:someone/corpus is a Hugging Face Hub data set and the Hub cannot be "
                                        "reached") as err:
        list(iter_documents("hf:someone/corpus", "text"))
    assert "\n" not in str(err.value)


def test_a_resaved_dataset_gets_a_new_fingerprint(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    first = fingerprint_source(str(tmp_path / "ds"), "text", index_dir=tmp_path / "index")
    assert fingerprint_source(str(tmp_path / "ds"), "text", index_dir=tmp_path / "index") == first
    datasets.Dataset.from_dict({"text": TEXTS[::-1]}).save_to_disk(str(tmp_path / "ds2"))
    assert fingerprint_source(str(tmp_path / "ds2"), "text", index_dir=tmp_path / "index") != first


def test_sft_and_preference_records_from_datasets(tmp_path):
    share = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(3)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    datasets.Dataset.from_list(share).save_to_disk(str(tmp_path / "chats"))
    assert read_conversations(tmp_path / "chats") == read_conversations(tmp_path / "chats.jsonl")
    alpaca = [{"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Bad.", "output": None}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))  # a JSON array, as Alpaca ships
    with pytest.raises(DataError, match=r"alpaca.json record 1: Alpaca records need string"):
        read_conversations(tmp_path / "alpaca.json")
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
    assert [record for _, record in read_jsonl(tmp_path / "pairs.parquet", "preference data")] == pairs

"""Reading run directories without torch: the method named from run.json as runs.py writes it (and the legacy
finetune.json), the status of a run sized in epochs, and the tail read in bounded chunks."""

from __future__ import annotations

import json
import os

import pytest

from cybertron.dashboard.folder import RunsFolder, describe_method, log_interval_s, run_status
from cybertron.dashboard.tail import read_new
from cybertron.finetune.lora import LoRASpec
from cybertron.runs import Adapters, RunMeta
from tests.unit.dashboard.conftest import make_run


@pytest.mark.parametrize("meta, expected", [
    (RunMeta("pretrain"), "pretrain"),
    (RunMeta("pretrain", "/hf/base"), "pretrain"),  # convert --from-hf
    (RunMeta("finetune", "/hf/base"), "sft (full)"),
    (RunMeta("finetune", "/hf/base", Adapters("qlora", LoRASpec())), "sft (qlora)"),
    (RunMeta("finetune", "/hf/base", Adapters("dora", LoRASpec()), align_method="simpo"), "simpo (dora)"),
    (RunMeta("reward", "/hf/base", head="reward", align_method="reward"), "reward (full)"),
    (RunMeta("finetune", "/hf/base", align_method="grpo"), "grpo (full)"),
])
def test_method_is_read_from_the_metadata_runs_py_writes(tmp_path, meta, expected):
    meta.write(tmp_path)
    assert RunMeta.from_dict(json.loads((tmp_path / "run.json").read_text())) == meta  # the file runs.py reads
    assert describe_method(tmp_path) == expected


def test_legacy_finetune_json_names_the_method(tmp_path):
    (tmp_path / "finetune.json").write_text(json.dumps({"method": "lora", "base_model": "/b", "align_method": "dpo",
                                                         "lora": LoRASpec().to_dict()}))
    assert describe_method(tmp_path) == "dpo (lora)"


def test_a_run_sized_in_epochs_is_finished_when_it_ends_on_an_evaluation_at_its_checkpoint():
    end = {"step": 12, "val_loss": 2.0}
    assert run_status(end, None, [6, 12], age_s=600) == "finished"
    assert run_status({"step": 12, "loss": 2.1}, None, [6, 12], age_s=600) == "stopped"
    assert run_status(end, None, [6, 12], age_s=5) == "running"
    assert run_status({"step": 9, "loss": 2.1}, 20, [6], age_s=5) == "running"


def test_a_slow_run_is_running_for_three_of_its_log_intervals(tmp_path):
    records = [{"step": 10, "loss": 3.0, "tokens": 10_000, "tokens_per_s": 20.0},
               {"step": 20, "loss": 2.9, "tokens": 20_000, "tokens_per_s": 25.0}]
    assert log_interval_s(records) == 400.0  # 10,000 tokens at 25 tokens/s
    run_dir = make_run(tmp_path, "slow", [5.0], total_steps=100, extra=tuple(records), age_s=1000)
    assert RunsFolder(tmp_path).summaries()[0].status == "running"  # quiet 1000 s < 3 x 400 s
    old = run_dir.stat().st_mtime - 300
    for p in [run_dir, *run_dir.rglob("*")]:
        os.utime(p, (old, old))
    assert RunsFolder(tmp_path).summaries()[0].status == "stopped"  # 1300 s


def test_the_folder_itself_may_be_one_run(tmp_path):
    make_run(tmp_path, "solo", [3.0], total_steps=1, checkpoints=(1,))
    folder = RunsFolder(tmp_path / "solo")
    assert list(folder.runs()) == ["solo"] and folder.summaries()[0].status == "finished"


def test_tail_in_small_chunks_returns_every_record_once(tmp_path):
    run_dir = make_run(tmp_path, "r", [5.0 - i / 10 for i in range(20)], total_steps=20)
    expected = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got, cursor, polls = [], "", 0
    while True:
        tail = read_new(run_dir / "metrics.jsonl", cursor, max_bytes=300)  # about two records a poll
        got += tail.records
        cursor, polls = tail.cursor, polls + 1
        if not tail.more:
            break
    assert got == expected and polls > 5

"""Experiment trackers (train/tracking.py, fed by metrics.py): what TensorBoard, wandb (offline) and MLflow (its
local file store) hold, read back with each library's own reader, equals metrics.jsonl, also across a resume,
and the config is logged once."""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cybertron.cli import main as cli_main
from cybertron.config import LogSection, check_log_section
from cybertron.errors import ConfigError, UserError
from cybertron.train.metrics import MetricsLogger
from cybertron.train.tracking import TRACKING_FILE

CONFIG = '[train]\nlr = 0.01\nsteps = 7\n\n[log]\nbackends = ["jsonl", "wandb", "mlflow"]\n'


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _series(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run file (run-ID.wandb). wandb 0.31 ships no Python reader (its Go
    core writes the file): the framing is LevelDB's log format (32 KiB blocks of [crc u32, length u16, type u8,
    data] chunks: 1 full, 2 first, 3 middle, 4 last) after a 7-byte ':W&B' header; each record is wandb's own
    protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_history(run_dir: Path) -> tuple[dict[str, dict[int, float]], list[str], dict]:
    """Every offline run under RUN/wandb: history by key and step, the run ids, and the config of the first."""
    history: dict[str, dict[int, float]] = {}
    ids, config = [], {}
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                config = config or {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return history, ids, config


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def tensorboard_scalars(run_dir: Path, key: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(key)}


def _log_steps(logger: MetricsLogger, steps: range) -> None:
    for step in steps:
        logger.log({"step": step, "loss": 5.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5, "tokens_per_s": 100.0,
                    "mfu": None})
        if step % 3 == 0:
            logger.log({"step": step, "val_loss": 6.0 / step, "val_ppl": 2.0})


def _killed_then_resumed(run_dir: Path, backend: str, between: Callable[[dict], None] = lambda ids: None
                         ) -> tuple[dict[str, str], list[dict]]:
    """A run that logs steps 1-5 and dies (its newest checkpoint: step 3), then resumes and logs 4-7 (4 and 5
    again, as a resumed run repeats them). Returns the tracker run ids and metrics.jsonl's records."""
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(CONFIG)
    log = LogSection(backends=[f"jsonl,{backend}"], wandb_mode="offline", run_name="tiny")
    first = MetricsLogger(run_dir, None, log)
    _log_steps(first, range(1, 6))
    first.close(ok=False)
    ids = json.loads((run_dir / TRACKING_FILE).read_text()) if backend != "tensorboard" else {}
    between(ids)
    if backend == "wandb":  # offline run folders are named by their start second: a real resume starts later
        time.sleep(1 - time.time() % 1)
    resumed = MetricsLogger(run_dir, None, log, resumed_at=3)
    _log_steps(resumed, range(4, 8))
    resumed.close()
    if ids:
        assert json.loads((run_dir / TRACKING_FILE).read_text()) == ids  # the same run went on
    records = _records(run_dir)
    assert sorted(_series(records, "loss")) == list(range(1, 8)) and sorted(_series(records, "val_loss")) == [3, 6]
    return ids, records


@pytest.mark.slow  # importing mlflow alone takes ~3 s of CPU
def test_mlflow_holds_what_metrics_jsonl_holds_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own reading client
    status = lambda ids: mlflow_client(tmp_path / "run").get_run(ids["mlflow"]).info.status
    killed = []
    ids, records = _killed_then_resumed(tmp_path / "run", "mlflow", lambda ids: killed.append(status(ids)))
    assert killed == ["FAILED"]
    client = mlflow_client(tmp_path / "run")
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)]
    for key in ("loss", "val_loss", "lr", "grad_norm"):  # each step once: 4 and 5 were not sent twice
        assert history(key) == sorted(_series(records, key).items())
    assert history("mfu") == []  # null in the JSONL: not a number to log
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["log.backends"] == '["jsonl", "wandb", "mlflow"]'
    artifact = Path(client.download_artifacts(ids["mlflow"], "config.toml", str(tmp_path)))
    assert artifact.read_text() == CONFIG


@pytest.mark.slow  # importing wandb and starting two runs: ~2 s of CPU, and a wandb-core process
def test_wandb_offline_holds_what_metrics_jsonl_holds_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids, records = _killed_then_resumed(tmp_path / "run", "wandb")
    history, run_ids, config = wandb_history(tmp_path / "run")
    assert run_ids == [ids["wandb"], ids["wandb"]]  # offline, a resume writes a second file of the same run
    for key in ("loss", "val_loss", "lr", "grad_norm"):
        assert history[key] == _series(records, key)
    assert "mfu" not in history
    assert config["train"] == {"lr": 0.01, "steps": 7}


def test_tensorboard_holds_what_metrics_jsonl_holds_across_a_resume(tmp_path):
    _, records = _killed_then_resumed(tmp_path / "run", "tensorboard")
    for key in ("loss", "val_loss", "lr"):  # float32 events; the first run's steps 4 and 5 purged
        assert tensorboard_scalars(tmp_path / "run", key) == pytest.approx(_series(records, key))


def test_a_new_run_forgets_the_ids_of_an_earlier_one(tmp_path):
    (tmp_path / TRACKING_FILE).write_text('{"wandb": "old"}')
    MetricsLogger(tmp_path, None, LogSection(tensorboard=False)).close()
    assert not (tmp_path / TRACKING_FILE).exists()


def test_backends_are_checked_before_anything_runs(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown backend 'wandbb'; did you mean wandb\?"):
        check_log_section(LogSection(backends=["jsonl,wandbb"]))
    with pytest.raises(ConfigError, match="log.wandb_mode must be"):
        check_log_section(LogSection(wandb_mode="ofline"))
    with pytest.raises(ConfigError, match="log.tensorboard is false"):
        check_log_section(LogSection(backends=["tensorboard"], tensorboard=False))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    with pytest.raises(ConfigError) as err:
        check_log_section(LogSection(backends=["mlflow"]))
    assert str(err.value) == ("log.backends includes mlflow, but the mlflow package is not installed: "
                              "pip install 'cybertron[mlflow]'")


def test_a_missing_backend_package_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert cli_main(["train", "--log.backends=wandb", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "error: log.backends includes wandb, but the wandb package is not installed: " \
                  "pip install 'cybertron[wandb]'\n"
    assert not (tmp_path / "run").exists()


def _train(run_dir: Path, log: LogSection, steps: int = 4):
    """A real training run through the one driver (session.run): the tiny token-stream task of test_session."""
    from cybertron.config import CheckpointSection, EvalSection
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config
    from cybertron.train import session
    from cybertron.train.optim import build_optimizer
    from cybertron.train.trainer import LanguageModelStep, Trainer
    from tests.unit.train.test_session import SEQ_LEN, TokenStreamTask

    model_cfg = preset_config("debug", vocab_size=64, n_layers=1, max_seq_len=SEQ_LEN)
    model = build_model(model_cfg, seed=0)
    trainer = Trainer(model, build_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 1e-8), LanguageModelStep(),
                      lambda step: 1e-2, 1.0)
    tokens = np.random.default_rng(0).integers(0, 64, 2000).astype(np.int32)
    driver = session.Driver(run_dir, None, trainer, [model], model_cfg, steps, EvalSection(every=2),
                            CheckpointSection(every=0, async_save=False), log,
                            write_run_files=lambda d: (d / "config.toml").write_text(CONFIG))
    session.run(driver, TokenStreamTask(trainer, tokens[:1600], tokens[1600:]), model)
    return _records(run_dir)


def test_a_training_run_writes_its_losses_and_config_to_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _train(tmp_path / "run", LogSection(every=1, backends=["tensorboard"], progress="lines"))
    for key in ("loss", "val_loss", "grad_norm"):
        assert tensorboard_scalars(tmp_path / "run", key) == pytest.approx(_series(records, key))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    (text,) = events.Tensors("config/text_summary")
    assert "lr = 0.01" in text.tensor_proto.string_val[0].decode()


@pytest.mark.slow  # wandb and mlflow imports and run starts: several seconds of CPU
def test_a_training_run_logs_to_wandb_and_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    records = _train(run_dir, LogSection(every=1, backends=["wandb", "mlflow"], tensorboard=False,
                                         progress="lines", wandb_mode="offline"))
    ids = json.loads((run_dir / TRACKING_FILE).read_text())
    history, _, _ = wandb_history(run_dir)
    client = mlflow_client(run_dir)
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s"):
        assert history[key] == _series(records, key)
        assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)] == \
            sorted(_series(records, key).items())
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert not (run_dir / "tensorboard").exists()


@pytest.mark.slow  # imports wandb
def test_wandb_online_without_a_login_is_one_line(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(UserError) as err:
        MetricsLogger(tmp_path, None, LogSection(backends=["wandb"], tensorboard=False, wandb_mode="online"))
    assert str(err.value).startswith("wandb could not start a run: No API key configured")
    assert str(err.value).endswith("run `wandb login`, or log offline with --log.wandb_mode=offline")


@pytest.mark.slow  # imports mlflow
def test_a_tracker_added_on_resume_gets_every_step_the_resumed_run_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    first = MetricsLogger(tmp_path, None, LogSection(tensorboard=False))
    _log_steps(first, range(1, 6))
    first.close(ok=False)
    resumed = MetricsLogger(tmp_path, None, LogSection(backends=["mlflow"], tensorboard=False), resumed_at=3)
    _log_steps(resumed, range(4, 8))
    resumed.close()
    run_id = json.loads((tmp_path / TRACKING_FILE).read_text())["mlflow"]
    history = mlflow_client(tmp_path).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 5.0 / s) for s in range(4, 8)]

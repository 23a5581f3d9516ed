"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow (`log.backends`).

Each tracker receives the numbers of the records metrics.jsonl gets, on the main rank only (metrics.py's
MetricsLogger calls them). A new run logs its resolved config once (config.toml, written before the logger
opens): wandb's run config, MLflow params plus the file as an artifact, a TensorBoard text entry. A resumed run
continues the same wandb / MLflow run: their ids are kept in RUN/tracking.json.

Every backend package is imported here, inside the tracker that needs it: they are optional extras, and
config.check_log_section has already refused a listed backend that is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from cybertron.config import LogSection, log_backends
from cybertron.errors import UserError
from cybertron.files import write_text_atomic

TRACKING_FILE = "tracking.json"  # the wandb / MLflow run ids a resumed run continues
MLFLOW_PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value


class Tracker(Protocol):
    # True when the tracker goes on with a run that already holds the steps sent before a resume, which it
    # cannot drop: it is not sent them again (metrics.py). TensorBoard drops them (purge_step): always False.
    continued: bool

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, ok: bool) -> None: ...


def open_trackers(log: LogSection, run_dir: Path, resumed_at: int | None) -> list[Tracker]:
    """The trackers log.backends asks for (TensorBoard also whenever log.tensorboard is on and it is
    installed). `resumed_at`: the checkpoint step a resumed run continues from; None for a new run."""
    names = log_backends(log)
    ids = _read_ids(run_dir) if resumed_at is not None else {}
    config = run_dir / "config.toml"
    config_text = config.read_text() if resumed_at is None and config.exists() else ""
    name = log.run_name or run_dir.resolve().name
    trackers: list[Tracker] = []
    try:
        if "tensorboard" in names:
            trackers.append(TensorBoardTracker(run_dir, resumed_at, config_text))
        elif log.tensorboard and importlib.util.find_spec("tensorboard") is not None:
            try:  # not asked for by name: a tensorboard that does not import with this torch is passed over
                trackers.append(TensorBoardTracker(run_dir, resumed_at, config_text))
            except ImportError:
                pass
        if "wandb" in names:
            trackers.append(WandbTracker(log, run_dir, name, ids.get("wandb"), config_text))
        if "mlflow" in names:
            trackers.append(MlflowTracker(log, run_dir, name, ids.get("mlflow"), config_text))
    except BaseException:
        for tracker in trackers:
            tracker.close(ok=False)
        raise
    new_ids = {**ids, **{t.key: t.run_id for t in trackers if isinstance(t, WandbTracker | MlflowTracker)}}
    if new_ids and new_ids != _read_ids(run_dir):
        write_text_atomic(run_dir / TRACKING_FILE, json.dumps(new_ids, indent=2) + "\n")
    elif not new_ids and resumed_at is None:  # a new run: an old run's ids must not be continued later
        (run_dir / TRACKING_FILE).unlink(missing_ok=True)
    return trackers


def _read_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / TRACKING_FILE
    try:
        ids = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # a run from before trackers, or a torn write: new ids
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


class TensorBoardTracker:
    """Events in RUN/tensorboard. Resumed, purge_step hides the old events from the checkpoint's step on, as
    metrics.jsonl drops its records."""

    continued = False

    def __init__(self, run_dir: Path, resumed_at: int | None, config_text: str):
        from torch.utils.tensorboard import SummaryWriter

        purge = 0 if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if config_text:  # indented: a code block in TensorBoard's markdown text view
            self.writer.add_text("config", "".join(f"    {line}\n" for line in config_text.splitlines()), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (offline: files under RUN/wandb that `wandb sync` uploads later)."""

    key = "wandb"

    def __init__(self, log: LogSection, run_dir: Path, name: str, run_id: str | None, config_text: str):
        import wandb

        try:
            self.run = wandb.init(
                project=log.wandb_project, entity=log.wandb_entity or None, name=name, dir=str(run_dir),
                mode=log.wandb_mode or None, id=run_id, resume="allow" if run_id else None,
                config=tomllib.loads(config_text) if config_text else None,
                # console capture would wrap this process's stdout, progress bar included: metrics.jsonl and
                # the records below already carry what the run prints.
                settings=wandb.Settings(console="off"))
        except Exception as err:  # no API key, no network, a bad entity: one line instead of a traceback
            first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
            raise UserError(f"wandb could not start a run: {first}; run `wandb login`, or log offline with "
                            "--log.wandb_mode=offline") from err
        self.run_id = self.run.id
        self.continued = run_id is not None

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


@contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 keeps its file store behind MLFLOW_ALLOW_FILE_STORE (maintenance mode), and mlflow-skinny has
    no database store: the local default opts in while its client is built (the store is made and cached
    then), and leaves the variable as it was."""
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MlflowTracker:
    """An MLflow run: metrics by step, the config as params and as the artifact config.toml."""

    key = "mlflow"

    def __init__(self, log: LogSection, run_dir: Path, name: str, run_id: str | None, config_text: str):
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.metric = Metric
        self.uri = log.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        try:
            with _file_store_allowed(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._continue(run_id) if run_id else None
            self.continued = self.run_id is not None
            if self.run_id is None:
                experiment = self.client.get_experiment_by_name(log.mlflow_experiment)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment(log.mlflow_experiment))
                self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            if config_text:
                params = [Param(k, v[:MLFLOW_PARAM_CHARS]) for k, v in _flat(tomllib.loads(config_text)).items()]
                for i in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
                    self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_PARAMS_PER_CALL])
                self.client.log_text(self.run_id, config_text, "config.toml")
        except MlflowException as err:
            raise UserError(f"MLflow at {self.uri}: {str(err).strip().splitlines()[0]}") from err

    def _continue(self, run_id: str) -> str | None:
        """Reopen the run a resumed run started; None when this tracking server does not know it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, v, now, step) for k, v in values.items()])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

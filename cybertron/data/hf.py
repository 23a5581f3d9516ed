"""Hugging Face `datasets` as a data source (the optional `[datasets]` extra).

A data path is read through `datasets` when it
  - starts with `hf:` followed by a Hub name (`hf:owner/name`), a local file or glob of .json/.jsonl/.parquet/
    .csv/.txt files (loaded by `load_dataset` with the builder its suffix names), or a directory;
  - or is a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read by `load_from_disk`).
`data.split` picks the split (a DatasetDict's key, or the `split=` of `load_dataset`), `data.subset` a Hub
data set's configuration, and `data.streaming` reads it as an IterableDataset (records arrive one by one
and nothing is downloaded whole). A Hub name needs the network: offline it is one error line.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cybertron.data.fingerprint import hash_files
from cybertron.errors import DataError

PREFIX = "hf:"
# load_dataset's builder for each file suffix (https://huggingface.co/docs/datasets/loading#local-and-remote-files).
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
             ".text": "text"}
_HUB_TIMEOUT_S = 5  # seconds to wait for the Hub's host before calling it unreachable
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclass(frozen=True)
class HFOptions:
    split: str = "train"
    subset: str = ""  # the Hub data set's configuration name (load_dataset's `name`)
    streaming: bool = False


HF_DEFAULTS = HFOptions()


def is_saved_dataset(path: Path) -> bool:
    """A directory written by save_to_disk: a Dataset (dataset_info.json + state.json) or a DatasetDict
    (dataset_dict.json, one folder per split). Both markers of a Dataset are required, so a text corpus that
    happens to hold a state.json is still read as text."""
    if not path.is_dir():
        return False
    return (path / "dataset_dict.json").is_file() or all((path / m).is_file() for m in _SAVED_MARKERS[:2])


def is_hf_source(path: str | None) -> bool:
    return bool(path) and (path.startswith(PREFIX) or is_saved_dataset(Path(path)))


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise DataError("reading a Hugging Face data set needs the `datasets` package; run "
                        "`pip install 'cybertron[datasets]'`") from err
    return datasets


def _local_files(spec: str) -> list[str]:
    """The existing files a local spec (a file or a glob) names, sorted; [] when it names none."""
    return sorted(glob.glob(spec)) if glob.has_magic(spec) else ([spec] if os.path.isfile(spec) else [])


def describe(path: str, options: HFOptions) -> str:
    """How errors name one data set: the path and, when it matters, the split."""
    return f"{path} (split {options.split!r})"


def load(path: str, options: HFOptions) -> Any:
    """The Dataset (or IterableDataset when streaming) a path names; DataError in one line otherwise."""
    ds = _datasets()
    spec = path[len(PREFIX):] if path.startswith(PREFIX) else path
    try:
        if is_saved_dataset(Path(spec)):
            loaded = ds.load_from_disk(spec)
            if isinstance(loaded, ds.DatasetDict):
                if options.split not in loaded:
                    raise DataError(f"{path} has no split {options.split!r}; its splits are {sorted(loaded)} "
                                    "(data.split)")
                loaded = loaded[options.split]
            return loaded.to_iterable_dataset() if options.streaming else loaded
        files = _local_files(spec)
        if files:
            suffixes = {Path(f).suffix.lower() for f in files}
            builders = {_BUILDERS.get(s) for s in suffixes}
            if None in builders or len(builders) != 1:
                raise DataError(f"{path}: load_dataset reads one kind of file at a time, one of "
                                f"{sorted(_BUILDERS)}; got {sorted(suffixes)}")
            # Local files hold one split, which load_dataset calls "train" whatever data.split says.
            return ds.load_dataset(builders.pop(), data_files=files, split="train", streaming=options.streaming)
        if Path(spec).exists() or spec.startswith((".", "/", "~")):
            if not Path(spec).exists():
                raise DataError(f"data path {path}: {spec} does not exist")
            return ds.load_dataset(spec, name=options.subset or None, split=options.split,
                                   streaming=options.streaming)
        return _load_hub(ds, path, spec, options)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, its own errors)
        raise DataError(f"{path} cannot be loaded by `datasets`: {_one_line(err)}") from err


def _load_hub(ds: Any, path: str, name: str, options: HFOptions) -> Any:
    unreachable = _hub_unreachable()
    if unreachable:
        raise DataError(f"{path} is a Hugging Face Hub data set and the Hub cannot be reached ({unreachable}); "
                        "download it where there is network (datasets' save_to_disk) and give that directory")
    try:
        return ds.load_dataset(name, name=options.subset or None, split=options.split, streaming=options.streaming)
    except Exception as err:
        raise DataError(f"{path} cannot be loaded from the Hugging Face Hub: {_one_line(err)}") from err


def _hub_unreachable() -> str:
    """Why the Hub cannot be reached (offline mode, no route to its host), or "" when it can: checked
    up front, since `datasets` would retry for a minute and log each try before failing."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return "offline mode is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=_HUB_TIMEOUT_S).close()
    except OSError as err:
        return f"{parsed.hostname}: {err.strerror or type(err).__name__}"
    return ""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def approx_chars(path: str, options: HFOptions) -> int:
    """About how many characters the data set holds (its files' bytes), 0 when unknown (a Hub name)."""
    spec = path[len(PREFIX):] if path.startswith(PREFIX) else path
    local = Path(spec)
    files = [p for p in local.rglob("*") if p.is_file()] if local.is_dir() else [Path(f) for f in _local_files(spec)]
    return sum(f.stat().st_size for f in files)


def iter_records(path: str, options: HFOptions) -> Iterator[tuple[str, dict[str, Any]]]:
    """("PATH record N", record) for every record of the data set, in its order."""
    dataset = load(path, options)
    for index, record in enumerate(dataset):
        yield f"{path} record {index}", record


def fingerprint(path: str, options: HFOptions, verify: bool, index_dir: Path | None = None) -> str:
    """A key that changes with the data set: its local files' content (memoized by their metadata in
    index_dir, sources.hash_files), or for a Hub name the data set's fingerprint as `datasets` reports it
    (only the name, subset and split when streaming: a streamed Hub data set is taken as fixed)."""
    salt = repr((path, options)).encode()
    spec = path[len(PREFIX):] if path.startswith(PREFIX) else path
    local = Path(spec)
    files = ([p for p in sorted(local.rglob("*")) if p.is_file()] if local.is_dir() else
             [Path(f) for f in _local_files(spec)])
    if files:
        root = local if local.is_dir() else Path(os.path.commonpath([f.parent for f in files]))
        return hash_files(files, root, salt, verify, index_dir)
    digest = hashlib.sha256(salt)
    if not options.streaming:
        digest.update(str(getattr(load(path, options), "_fingerprint", "")).encode())
    return digest.hexdigest()

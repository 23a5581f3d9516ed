"""Records (JSON objects) of a fine-tuning or alignment data set, each with a name for error messages.

A `.jsonl` file is read here, line by line ("FILE:LINE"); everything else goes through Hugging Face
`datasets` (data/hf.py, "PATH record N"): `hf:` paths, save_to_disk folders, and .json (a JSON array, as
Alpaca ships), .parquet and .csv files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cybertron.data import hf
from cybertron.data.hf import HF_DEFAULTS, HFOptions
from cybertron.data.sources import utf8_lines
from cybertron.errors import DataError

_THROUGH_DATASETS = (".parquet", ".csv")


def read_records(path: str | Path, what: str,
                 hf_options: HFOptions = HF_DEFAULTS) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record; DataError naming the file and line (or record) for a bad one."""
    text = str(path)
    if hf.is_hf_source(text) or Path(text).suffix.lower() in _THROUGH_DATASETS or _is_json_array(Path(text)):
        for where, record in hf.iter_records(text if hf.is_hf_source(text) else hf.PREFIX + text, hf_options):
            yield where.removeprefix(hf.PREFIX) if not hf.is_hf_source(text) else where, record
        return
    file = Path(text)
    if not file.is_file():
        raise DataError(f"{what} file {file} does not exist")
    for lineno, line in utf8_lines(file):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _is_json_array(file: Path) -> bool:
    """A .json file holding one JSON array (not JSON Lines): its first non-blank byte is '['."""
    if file.suffix.lower() != ".json" or not file.is_file():
        return False
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")

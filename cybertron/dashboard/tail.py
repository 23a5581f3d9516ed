"""Reading metrics.jsonl incrementally: each poll returns only the records written since the last one.

A cursor is `"<inode>:<byte offset>"`. Only whole lines are read (a line still being written is left for the
next poll). The trainer rewrites the file on resume (records after the checkpoint dropped, through a rename) and
replaces it when a run is started again from scratch: either gives the file a new inode, or makes it shorter
than the cursor, and the reader then starts over with `reset` set, so the page drops what it had drawn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # train/metrics.py's MetricsLogger writes it
MAX_CHUNK_BYTES = 4 << 20  # one poll's reply stays small; `more` asks the page to poll again at once


@dataclass
class Tail:
    records: list[dict[str, Any]] = field(default_factory=list)
    cursor: str = ""
    reset: bool = False  # the file was rewritten: drop what earlier polls returned
    more: bool = False  # the chunk limit cut this reply short


def parse_cursor(cursor: str) -> tuple[int, int] | None:
    """(inode, offset), or None for an empty or malformed cursor (read from the start)."""
    inode, sep, offset = cursor.partition(":")
    if not sep or not inode.isdigit() or not offset.isdigit():
        return None
    return int(inode), int(offset)


def read_new(path: Path, cursor: str = "", max_bytes: int = MAX_CHUNK_BYTES) -> Tail:
    """The records appended to `path` since `cursor` (every record for an empty cursor)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; fstat needs the open file
    except FileNotFoundError:
        return Tail(cursor="", reset=bool(cursor))
    with f:
        st = os.fstat(f.fileno())
        position = parse_cursor(cursor)
        reset = position is not None and (position[0] != st.st_ino or position[1] > st.st_size)
        offset = 0 if position is None or reset else position[1]
        f.seek(offset)
        chunk = f.read(max_bytes)
    whole = chunk[: chunk.rfind(b"\n") + 1]  # a torn or unfinished last line waits for the next poll
    records = []
    for line in whole.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill (the trainer drops it on resume): skip it
            continue
        if isinstance(record, dict):
            records.append(record)
    end = offset + len(whole)
    return Tail(records, f"{st.st_ino}:{end}", reset, more=end < st.st_size and len(chunk) == max_bytes)


def read_last(path: Path, window_bytes: int = 64 << 10) -> list[dict[str, Any]]:
    """The records in the last `window_bytes` of `path` (for a summary: the newest step, loss, speed), oldest
    first; the first line of the window may be cut and is skipped."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - window_bytes)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.splitlines()
    if start > 0 and lines:
        lines = lines[1:]
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records

"""Cache directories that are either complete or absent: built aside, then published with one rename."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cybertron import files


def cache_key(*parts: object) -> str:
    """sha256 hex of the parts' reprs, separated so ("ab", "c") and ("a", "bc") differ."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `final`; when the block succeeds, rename it to `final`.

    A run killed mid-write leaves only a hidden temp directory, never a `final` that a later run trusts.
    If another process published `final` first (ranks building the same cache at once), its copy is kept
    and ours is discarded: both were built from the same inputs.
    """
    with files.atomic_directory(final, keep_published=True) as tmp:
        yield tmp

"""Content hashes of data files, remembered by their metadata so a restart reads none of their bytes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cybertron.errors import DataError
from cybertron.files import write_text_atomic

_HASH_CHUNK_BYTES = 1 << 22  # bytes read per update when hashing content


@contextmanager
def reading(file: Path) -> Iterator[None]:
    """Report a file that cannot be read (no permission, a dangling link, an I/O error) as one DataError line
    naming it, instead of an OSError traceback."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{file} cannot be read ({e.strerror or type(e).__name__}); fix its permissions or "
                        "remove it from the data folder") from e


def hash_files(files: list[Path], root: Path, salt: bytes, verify: bool, index_dir: Path | None) -> str:
    """Content hash of (salt, each file's name relative to root and bytes), memoized by metadata in index_dir."""
    memo = None
    if index_dir is not None:
        by_metadata = hashlib.sha256(b"metadata\0" + salt)
        for file in files:
            _hash_name(file, root, by_metadata)
            with reading(file):
                _hash_metadata(file, by_metadata)
        memo = Path(index_dir) / f"{by_metadata.hexdigest()}.txt"
        if not verify and memo.is_file():
            return memo.read_text(encoding="utf-8").strip()
    digest = hashlib.sha256(salt)
    for file in files:
        _hash_name(file, root, digest)
        with reading(file):
            _hash_file(file, digest)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, digest.hexdigest() + "\n")
    return digest.hexdigest()


def _hash_name(file: Path, root: Path, digest: Any) -> None:
    name = file.relative_to(root).as_posix().encode()
    # Length prefixes keep (name, bytes) pairs unambiguous when concatenated.
    digest.update(len(name).to_bytes(8, "little") + name)


def _hash_metadata(file: Path, digest: Any) -> None:
    stat = file.stat()  # follows a link: a dangling one is an OSError, named by reading()
    if not os.access(file, os.R_OK):
        raise PermissionError(13, "Permission denied", str(file))
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}\0".encode())


def _hash_file(file: Path, digest: Any) -> None:
    with open(file, "rb") as f:
        digest.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)

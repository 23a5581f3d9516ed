"""A checkpoint's manifest: the size and SHA-256 of every file in it, written last.

A checkpoint directory counts as complete only once `manifest.json` is in it, and loading re-hashes every file
against it first, so flipped bytes, a truncated `.metadata` or a file swapped in from elsewhere are found
before DCP reads anything. SHA-256 (hashlib, no extra dependency) rather than a CRC: it is the standard a user can
check with `sha256sum`, and with the CPU's SHA extensions it hashes faster than a disk delivers data, so
the check costs a re-read of the checkpoint, not the hash (bench/RESULTS.md, issue 13).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt: Path) -> None:
    """Hash every file in `ckpt` as it is on disk and write the manifest through a temporary file, fsync and
    rename, so a manifest is either whole or absent."""
    ckpt = Path(ckpt)
    files = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _files(ckpt)}
    tmp = ckpt / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MANIFEST)


def has_manifest(ckpt: Path) -> bool:
    return (Path(ckpt) / MANIFEST).is_file()


def verify(ckpt: Path) -> str | None:
    """None when every file the manifest lists is there with its size and hash; else what is wrong, naming the
    file ("__0_0.distcp: content differs from the manifest (sha256)")."""
    ckpt = Path(ckpt)
    try:
        listed = json.loads((ckpt / MANIFEST).read_text())["files"]
        assert isinstance(listed, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for name, want in sorted(listed.items()):
        path = ckpt / name
        try:
            if path.stat().st_size != want["size"]:
                return f"{name}: {path.stat().st_size} bytes, the manifest says {want['size']}"
            if file_sha256(path) != want["sha256"]:
                return f"{name}: content differs from the manifest (sha256)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} is unreadable ({err.strerror or err})"
        except (KeyError, TypeError):
            return f"{MANIFEST} is unreadable (entry {name})"
    return None  # a file added later is not read by DCP (it reads what the hashed .metadata names)

"""Files and directories that are either complete or absent: written aside, then published with one rename.

A process killed mid-write (SIGKILL, a node lost, a full disk) leaves at most a hidden temp file or directory
beside the target, never a half-written target that a later command trusts. The temp entry sits in the
target's own directory so the rename stays on one filesystem, where POSIX makes it atomic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cybertron.errors import UserError

TEMP_MARK = ".tmp-"  # temp names are ".{target name}.tmp-XXXX": hidden, and named after what they become


@contextmanager
def atomic_directory(final: Path, keep_published: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside `final`; when the block succeeds, rename it to `final`.

    `final` may be absent or an empty directory (rename replaces an empty directory). When `final` is not
    empty by then: with keep_published (caches, where ranks build the same entry from the same inputs) the
    copy already there is kept and ours discarded; otherwise UserError, since something else wrote there
    meanwhile and neither copy should silently win. The temp directory is removed whatever happens, short of
    the process being killed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARK}", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would honour the umask
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError as err:
            if not final.is_dir():
                raise
            if not keep_published:
                raise UserError(f"{final} was filled by something else while this command wrote it; nothing "
                                "was changed there: choose a new directory") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final` to write; when the block succeeds, it replaces `final` (an existing
    `final` is replaced in one step, so readers see the old or the new file, never a mix)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}{TEMP_MARK}", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain write would honour the umask
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def is_empty_or_absent(path: Path) -> bool:
    """True when `path` does not exist or is an empty directory: where atomic_directory can publish."""
    path = Path(path)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def write_text_atomic(path: Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8) through a temp file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def copy_file_atomic(src: Path, dst: Path) -> None:
    """`shutil.copyfile(src, dst)` through a temp file and a rename."""
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

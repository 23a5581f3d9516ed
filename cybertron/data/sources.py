"""Documents from the bundled default corpus (the stdlib's own source) or from user text/jsonl/parquet files.

A *source* is a path (file or directory) or None for the default corpus; a Hugging Face data set (`hf:...`
or a save_to_disk directory) is read through data/hf.py. Every file is read by its
suffix: `.jsonl`/`.json` are JSON Lines (one document per line, from a named field), `.parquet` is a
column of a table, anything else is one UTF-8 document per file.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from cybertron.data import hf
from cybertron.data.fingerprint import hash_files, reading
from cybertron.data.hf import HF_DEFAULTS, HFOptions, is_hf_source
from cybertron.errors import DataError

# Installed third-party packages and bytecode are not "the stdlib"; they also differ between machines.
_DEFAULT_CORPUS_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_JSON_LINES_SUFFIXES = frozenset({".jsonl", ".json"})
_PARQUET_SUFFIX = ".parquet"
_PARQUET_BATCH_ROWS = 1024  # rows per pyarrow batch: bounds memory on large tables


def default_corpus_root() -> Path:
    """The Python standard library's directory: a corpus that exists wherever Python does."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_default(path: str | None) -> bool:
    return path is None or path == ""


def utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 text file (JSON Lines): a file that cannot be read or a
    line that is not UTF-8 is one DataError line naming the file (and the line)."""
    with reading(file), open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}:{lineno}: not UTF-8 ({e.reason}); JSON Lines files must be UTF-8") from e
            yield lineno, line


def _unreadable_directory(err: OSError) -> None:
    raise DataError(f"{err.filename} cannot be read ({err.strerror}); fix its permissions or remove it from "
                    "the data folder") from err


def _walk_sorted(root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]) -> list[Path]:
    """Regular files passing keep_file in directories passing keep_dir, sorted by path relative to root.
    A symbolic link is kept even when its target is gone, so reading it names the broken link instead of
    training on less data without a word."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unreadable_directory):
        dirnames[:] = [d for d in dirnames if keep_dir(d)]
        for name in filenames:
            file = Path(dirpath) / name
            if keep_file(name) and (file.is_file() or file.is_symlink()):
                found.append(file)
    return sorted(found, key=lambda f: f.relative_to(root).as_posix())


def list_source_files(path: str | None) -> list[Path]:
    """Files that make up a source: the default corpus for None/"", [path] for a file, a directory's files."""
    if _is_default(path):
        return _walk_sorted(
            default_corpus_root(),
            keep_dir=lambda d: d not in _DEFAULT_CORPUS_SKIP_DIRS,
            keep_file=lambda name: name.endswith(".py"),
        )
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {path} does not exist; give an existing file or directory, or none "
                        "for the bundled default corpus")
    if p.is_file():
        return [p]
    # Hidden entries (.git, .DS_Store, editor swap files) are never data.
    visible = lambda name: not name.startswith(".")
    return _walk_sorted(p, keep_dir=visible, keep_file=visible)


def _source_root(path: str | None) -> Path:
    """The directory that relative file names (for fingerprints) are taken against."""
    if _is_default(path):
        return default_corpus_root()
    p = Path(path)
    return p.parent if p.is_file() else p


def _iter_json_lines(file: Path, text_field: str) -> Iterator[str]:
    with reading(file), open(file, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if raw.strip():
                yield _text_of_json_line(raw, f"{file} line {line_number}", text_field)


def _text_of_json_line(raw: bytes, where: str, text_field: str) -> str:
    """The text field of one JSON Lines record; `where` names the file and line for error messages."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 ({e.reason}); JSON Lines files must be UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}); expected one JSON object per line "
                        "(JSON Lines)") from e
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; expected one object "
                        f"per line with a {text_field!r} field (JSON Lines)")
    value = record.get(text_field)
    if not isinstance(value, str):
        raise DataError(f"{where} has no string field {text_field!r}; every line needs one, or set the "
                        "text field to the name your file uses")
    return value


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading .parquet files needs pyarrow; run `pip install pyarrow`") from e
    return pq


def _iter_parquet(file: Path, text_field: str) -> Iterator[str]:
    pq = _import_parquet()
    try:
        table = pq.ParquetFile(file)
        names = table.schema_arrow.names
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise DataError(f"{file} is not a readable parquet file ({e}); check that it is complete") from e
    if text_field not in names:
        raise DataError(f"{file} has no column {text_field!r}; its columns are {names}")
    try:
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{file} column {text_field!r} holds {type(value).__name__} values; "
                                    "it must hold strings")
                if value:
                    yield value
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{file} is not a readable parquet file ({e}); check that it is complete") from e


def _read_text_file(file: Path, skip_undecodable: bool) -> Iterator[str]:
    with reading(file):
        data = file.read_bytes()
    try:
        # Decode bytes (not read_text) so documents keep their exact line endings.
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not skip_undecodable:
            raise DataError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); give a UTF-8 file, "
                            ".jsonl or .parquet") from e


def _iter_file(file: Path, text_field: str, in_directory: bool) -> Iterator[str]:
    suffix = file.suffix.lower()
    if suffix in _JSON_LINES_SUFFIXES:
        return _iter_json_lines(file, text_field)
    if suffix == _PARQUET_SUFFIX:
        return _iter_parquet(file, text_field)
    return _read_text_file(file, skip_undecodable=in_directory)


def iter_documents(path: str | None, text_field: str = "text", hf_options: HFOptions = HF_DEFAULTS) -> Iterator[str]:
    """Yield every non-empty document of a source, in a stable order (files sorted by relative path)."""
    if is_hf_source(path):
        yield from _hf_documents(path, text_field, hf_options)
        return
    files = list_source_files(path)
    in_directory = _is_default(path) or Path(path).is_dir()
    found_any = False
    for file in files:
        for document in _iter_file(file, text_field, in_directory):
            if document:
                found_any = True
                yield document
    if not found_any:
        name = "the default corpus" if _is_default(path) else f"data path {path}"
        raise DataError(f"{name} contains no text; give UTF-8 text, .jsonl or .parquet files with "
                        f"non-empty {text_field!r} values")


def _hf_documents(path: str, text_field: str, options: HFOptions) -> Iterator[str]:
    found_any = False
    for where, record in hf.iter_records(path, options):
        value = record.get(text_field)
        if not isinstance(value, str):
            raise DataError(f"{where} has no string field {text_field!r} (its fields: {sorted(record)}); set "
                            "data.text_field to the name the data set uses")
        if value:
            found_any = True
            yield value
    if not found_any:
        raise DataError(f"{hf.describe(path, options)} holds no non-empty {text_field!r} text")


def approx_source_chars(path: str | None, hf_options: HFOptions = HF_DEFAULTS) -> int:
    """About how many characters a source holds (its bytes; 0 when unknown), to spread a sample over it."""
    if is_hf_source(path):
        return hf.approx_chars(path, hf_options)
    return sum(f.stat().st_size for f in list_source_files(path))


def fingerprint_source(path: str | None, text_field: str, verify: bool = False,
                       hf_options: HFOptions = HF_DEFAULTS, index_dir: Path | None = None) -> str:
    """sha256 over every file's relative name and bytes plus text_field: changes when any content does.

    With index_dir, the hash is remembered there under the files' metadata (names, sizes, mtime_ns, inodes):
    a later call on files with the same metadata returns it without reading a byte, so a restart on a large
    corpus costs one stat per file. verify=True always reads every byte (and refreshes the memo), which
    catches a file rewritten in place with its old size and mtime restored."""
    if is_hf_source(path):
        return hf.fingerprint(path, hf_options, verify, index_dir) + f"/text_field={text_field}"
    return hash_files(list_source_files(path), _source_root(path), f"text_field={text_field}\0".encode(),
                      verify, index_dir)

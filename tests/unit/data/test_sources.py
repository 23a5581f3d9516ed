import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cybertron.data.sources import (
    default_corpus_root,
    fingerprint_source,
    iter_documents,
    list_source_files,
)
from cybertron.errors import DataError, UserError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_default_corpus_is_the_stdlib_python_source():
    # The only test that reads the real default corpus: listing and hashing only, no tokenization.
    files = list_source_files(None)
    root = default_corpus_root()
    relative = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 1000
    assert relative == sorted(relative)
    assert all(name.endswith(".py") for name in relative)
    assert not any(part in ("site-packages", "__pycache__") for name in relative for part in name.split("/"))
    assert "os.py" in relative
    assert list_source_files("") == files
    assert fingerprint_source(None, "text") == fingerprint_source("", "text")


def test_text_file_is_one_document_with_exact_line_endings(tmp_path):
    file = tmp_path / "a.txt"
    file.write_bytes(b"line one\r\nline two\n")
    assert list(iter_documents(str(file))) == ["line one\r\nline two\n"]


def test_directory_yields_files_sorted_skipping_hidden_empty_and_undecodable(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.py").write_text("zed", encoding="utf-8")
    (tmp_path / "c.txt").write_text("", encoding="utf-8")
    (tmp_path / "d.bin").write_bytes(b"\xff\xfe\x00\x80")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("git", encoding="utf-8")
    names = [f.relative_to(tmp_path).as_posix() for f in list_source_files(str(tmp_path))]
    assert names == ["a/z.py", "b.txt", "c.txt", "d.bin"]
    assert list(iter_documents(str(tmp_path))) == ["zed", "bee"]


def test_single_undecodable_file_is_an_error(tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        list(iter_documents(str(file)))


def test_jsonl_reads_the_named_field_and_skips_blank_lines(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"body": "first", "id": 1}\n\n{"body": "second"}\n{"body": ""}\n', encoding="utf-8")
    assert list(iter_documents(str(file), text_field="body")) == ["first", "second"]


def test_malformed_jsonl_line_names_file_and_line_number(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 3 is not valid JSON"):
        list(iter_documents(str(file)))


def test_jsonl_line_without_the_field_names_line_and_field(tmp_path):
    file = tmp_path / "records.json"
    write_jsonl(file, [{"text": "ok"}, {"content": "no text key"}])
    with pytest.raises(DataError, match=r"records.json line 2 has no string field 'text'"):
        list(iter_documents(str(file)))
    write_jsonl(file, [{"text": 5}])
    with pytest.raises(DataError, match="line 1 has no string field"):
        list(iter_documents(str(file)))
    write_jsonl(file, [[{"text": "a JSON array is not JSON Lines"}]])
    with pytest.raises(DataError, match="line 1 is a JSON list, not an object"):
        list(iter_documents(str(file)))


def test_parquet_column_is_read_in_batches(tmp_path):
    file = tmp_path / "table.parquet"
    texts = [f"row {i}" for i in range(2500)] + [None, ""]  # more rows than one read batch
    pq.write_table(pa.table({"content": texts, "n": list(range(len(texts)))}), file, row_group_size=1000)
    assert list(iter_documents(str(file), text_field="content")) == texts[:2500]


def test_parquet_without_the_column_names_file_and_columns(tmp_path):
    file = tmp_path / "table.parquet"
    pq.write_table(pa.table({"body": ["x"]}), file)
    with pytest.raises(DataError, match=r"table.parquet has no column 'text'; its columns are \['body'\]"):
        list(iter_documents(str(file)))


def test_corrupt_parquet_names_file(tmp_path):
    file = tmp_path / "broken.parquet"
    file.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match="broken.parquet is not a readable parquet file"):
        list(iter_documents(str(file)))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    file = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": ["x"]}), file)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(DataError, match="pip install pyarrow"):
        list(iter_documents(str(file)))


def test_empty_file_contains_no_text(tmp_path):
    file = tmp_path / "empty.txt"
    file.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt contains no text"):
        list(iter_documents(str(file)))


def test_empty_directory_contains_no_text(tmp_path):
    with pytest.raises(DataError, match="contains no text"):
        list(iter_documents(str(tmp_path)))


def test_missing_path_is_a_user_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"data path {missing} does not exist") as info:
        list(iter_documents(str(missing)))
    assert isinstance(info.value, UserError)
    with pytest.raises(DataError, match="does not exist"):
        fingerprint_source(str(missing), "text")


def test_fingerprint_is_a_content_hash(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta", encoding="utf-8")
    first = fingerprint_source(str(tmp_path), "text")
    assert fingerprint_source(str(tmp_path), "text") == first
    assert fingerprint_source(str(tmp_path), "body") != first
    (tmp_path / "b.txt").write_text("beta!", encoding="utf-8")
    edited = fingerprint_source(str(tmp_path), "text")
    assert edited != first
    (tmp_path / "b.txt").rename(tmp_path / "c.txt")  # same bytes under another name
    assert fingerprint_source(str(tmp_path), "text") != edited


_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads files whatever their mode


def _folder_with_a_bad_file(tmp_path, fault):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text\n")
    bad = folder / "b.txt"
    if fault == "dangling link":  # a link to a file on a disk that is gone: is_file() is False for it
        bad.symlink_to(tmp_path / "gone.txt")
    else:
        bad.write_text("secret\n")
        bad.chmod(0)
    return folder, bad


@pytest.mark.parametrize("fault", ["dangling link",
                                   pytest.param("no permission", marks=pytest.mark.skipif(
                                       _AS_ROOT, reason="root reads a file of mode 000"))])
@pytest.mark.parametrize("reader", [lambda p: list(iter_documents(p)), lambda p: fingerprint_source(p, "text")])
def test_an_unreadable_file_in_a_folder_is_one_error_naming_it(tmp_path, fault, reader):
    folder, bad = _folder_with_a_bad_file(tmp_path, fault)
    with pytest.raises(DataError, match=f"{bad} cannot be read"):
        reader(str(folder))


@pytest.mark.skipif(_AS_ROOT, reason="root lists a directory of mode 000")
def test_an_unreadable_subfolder_is_one_error_naming_it(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("fine text\n")
    (folder / "sub").chmod(0)
    with pytest.raises(DataError, match=f"{folder / 'sub'} cannot be read"):
        list_source_files(str(folder))


def _rewrite_keeping_metadata(file, text):
    """Rewrite a file in place with same-size content and its old mtime: only a content hash sees it."""
    before = os.stat(file)
    with open(file, "r+b") as f:  # in place: same inode
        f.write(text.encode())
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(file)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def test_a_restart_trusts_file_metadata_and_verify_reads_the_bytes(tmp_path):
    corpus, index = tmp_path / "corpus", tmp_path / "index"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha", encoding="utf-8")
    (corpus / "b.txt").write_text("beta", encoding="utf-8")
    first = fingerprint_source(str(corpus), "text", index_dir=index)
    assert first == fingerprint_source(str(corpus), "text")  # the memoized value is the content hash
    _rewrite_keeping_metadata(corpus / "b.txt", "BETA")
    # Same names, sizes, mtimes and inodes: the remembered hash is returned without reading a byte (so the
    # edit goes unseen), while verify hashes the content and refreshes the memo.
    assert fingerprint_source(str(corpus), "text", index_dir=index) == first
    verified = fingerprint_source(str(corpus), "text", verify=True, index_dir=index)
    assert verified != first and verified == fingerprint_source(str(corpus), "text")
    assert fingerprint_source(str(corpus), "text", index_dir=index) == verified
    # A changed mtime (same size) or a changed size invalidates the memo: the content is hashed again.
    before = os.stat(corpus / "a.txt")
    (corpus / "a.txt").write_text("ALPHA", encoding="utf-8")
    os.utime(corpus / "a.txt", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    touched = fingerprint_source(str(corpus), "text", index_dir=index)
    assert touched not in (first, verified) and touched == fingerprint_source(str(corpus), "text")
    (corpus / "a.txt").write_text("ALPHA, longer", encoding="utf-8")
    resized = fingerprint_source(str(corpus), "text", index_dir=index)
    assert resized != touched and resized == fingerprint_source(str(corpus), "text")

"""Document readers on the real corpora: text, JSON Lines (plain and gzip), Parquet, globs,
memory:// URLs, the embedded standard-library corpus, errors, and the content-hash split."""

import gzip
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainables.corpus import (
    EMBEDDED,
    CorpusError,
    embedded_corpus_docs,
    is_validation,
    iter_documents,
    source_fingerprint,
    split_documents,
    split_source,
    stdlib_files,
)

DATA = Path(__file__).parents[1].parent / "shared" / "data"
SHAKESPEARE, FORTUNES = DATA / "tinyshakespeare.txt", DATA / "zh_fortunes.txt"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"test corpora absent: {DATA}")


@pytest.fixture(scope="module")
def en_docs():
    return list(iter_documents(str(SHAKESPEARE)))


@pytest.fixture(scope="module")
def zh_docs():
    return list(iter_documents(str(FORTUNES)))


def test_text_documents_are_blank_line_separated(en_docs, zh_docs):
    assert len(en_docs) == 7222 and len(zh_docs) == 11061
    assert en_docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert zh_docs[0] == "要有礼貌"
    assert zh_docs[1].startswith("在 Debian 这种规模的项目中，很难避免遇到与你意见不和")
    for doc in en_docs + zh_docs:
        assert doc.strip() and "\n\n" not in doc and not doc.endswith("\n")


def _jsonl(docs, extra=None):
    return "".join(
        json.dumps({"id": i, "text": d, **(extra or {})}) + "\n" for i, d in enumerate(docs)
    )


def test_jsonl_plain_and_gzip_round_trip(tmp_path, en_docs, zh_docs):
    docs = en_docs[:300] + zh_docs[:300]
    (tmp_path / "a.jsonl").write_text(_jsonl(docs), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(_jsonl(docs))
    assert list(iter_documents(str(tmp_path / "a.jsonl"))) == docs
    assert list(iter_documents(str(tmp_path / "b.jsonl.gz"))) == docs
    assert list(iter_documents(f"file://{tmp_path}/b.jsonl.gz")) == docs


def test_parquet_reads_every_row_group(tmp_path, zh_docs):
    docs = zh_docs[:1000]
    table = pa.table({"content": docs, "n": list(range(len(docs)))})
    pq.write_table(table, tmp_path / "zh.parquet", row_group_size=128)
    assert pq.ParquetFile(tmp_path / "zh.parquet").num_row_groups == 8
    assert list(iter_documents(str(tmp_path / "zh.parquet"), text_field="content")) == docs
    with pytest.raises(CorpusError, match=r"zh\.parquet: no column 'text' \(columns: content, n\)"):
        list(iter_documents(str(tmp_path / "zh.parquet")))


def test_glob_reads_matching_files_in_sorted_order(tmp_path, en_docs):
    for i in range(3):
        (tmp_path / f"part-{i}.txt").write_text("\n\n".join(en_docs[i * 10 : i * 10 + 10]) + "\n")
    (tmp_path / "notes.md").write_text("not matched\n")
    assert list(iter_documents(str(tmp_path / "part-*.txt"))) == en_docs[:30]
    both = [str(tmp_path / "part-0.txt"), str(tmp_path / "notes.md")]
    assert list(iter_documents(both)) == en_docs[:10] + ["not matched"]


def test_memory_url(en_docs):
    fs = fsspec.filesystem("memory")
    try:
        with fsspec.open("memory://corpus/en.jsonl", "w") as f:
            f.write(_jsonl(en_docs[:50]))
        assert list(iter_documents("memory://corpus/*.jsonl")) == en_docs[:50]
    finally:
        fs.rm("/corpus", recursive=True)


def test_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 4: bad JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_missing_field_and_wrong_type_name_the_line(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"f\.jsonl, line 2: no field 'text' \(fields: body\)"):
        list(iter_documents(str(tmp_path / "f.jsonl")))
    (tmp_path / "g.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"line 1: field 'text' is int, not a string"):
        list(iter_documents(str(tmp_path / "g.jsonl")))


def test_missing_file_empty_glob_and_unknown_suffix(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    with pytest.raises(CorpusError, match=r"no file matches this glob"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    (tmp_path / "data.csv").write_text("a\n")
    with pytest.raises(CorpusError, match=r"cannot infer the format from '\.csv'"):
        list(iter_documents(str(tmp_path / "data.csv")))
    assert list(iter_documents(str(tmp_path / "data.csv"), fmt="text")) == ["a"]
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not UTF-8 text"):
        list(iter_documents(str(tmp_path / "latin1.txt")))
    with pytest.raises(CorpusError, match="is a folder, not a file"):
        list(iter_documents(str(tmp_path)))
    with pytest.raises(CorpusError, match=r"fmt='csv' is not a known format"):
        list(iter_documents(str(tmp_path / "data.csv"), fmt="csv"))


def test_zst_reads_or_says_what_to_install(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd")  # the zstd magic number
        with pytest.raises(CorpusError, match="needs the `zstandard` package"):
            list(iter_documents(str(path)))
        return
    path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(["a", "b"]).encode()))
    assert list(iter_documents(str(path))) == ["a", "b"]


def test_max_chars_stops_exactly(en_docs):
    docs = list(iter_documents(str(SHAKESPEARE), max_chars=10_000))
    assert sum(map(len, docs)) == 10_000
    assert docs[:-1] == en_docs[: len(docs) - 1] and en_docs[len(docs) - 1].startswith(docs[-1])


def test_embedded_corpus_is_real_and_deterministic():
    first = list(iter_documents(EMBEDDED, max_chars=200_000))
    assert first == list(iter_documents(EMBEDDED, max_chars=200_000))
    assert len(first) > 20 and sum(map(len, first)) == 200_000
    assert any('"""' in doc for doc in first)  # docstrings are part of it
    names = [p.as_posix() for p in stdlib_files()]
    assert len(names) > 500 and any(n.endswith("/json/decoder.py") for n in names)
    assert not any("/test/" in n or "/site-packages/" in n for n in names)
    assert next(embedded_corpus_docs()) == first[0]


def test_split_source_cuts_before_definitions_and_loses_nothing():
    for path in stdlib_files()[:40]:
        source = path.read_text(encoding="utf-8")
        pieces = split_source(source)
        assert "".join(pieces) == source
        for piece in pieces[1:]:
            assert piece.lstrip().startswith(("def ", "class ", "async def ", "@"))


def test_fingerprint_follows_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n")
    before = source_fingerprint(str(path))
    assert source_fingerprint([str(path)]) == before
    path.write_text("one two\n")
    assert source_fingerprint(str(path)) != before


def test_split_is_deterministic_nested_and_near_the_fraction(zh_docs):
    train, val = split_documents(zh_docs, 0.1, seed=0)
    assert (train, val) == split_documents(zh_docs, 0.1, seed=0)
    assert len(train) + len(val) == len(zh_docs)
    sigma = (len(zh_docs) * 0.1 * 0.9) ** 0.5
    assert abs(len(val) - 0.1 * len(zh_docs)) < 4 * sigma
    assert set(split_documents(zh_docs, 0.05)[1]) <= set(val)  # a larger fraction only adds
    assert split_documents(zh_docs, 0.1, seed=1)[1] != val


def test_split_membership_is_pinned(zh_docs):
    """Reference values: the split must not change across machines, Python or NumPy versions."""
    sides = "".join("v" if is_validation(d, 0.5) else "t" for d in zh_docs[:24])
    assert sides == "tvtvvtvtvvvvtvvtvttttvvv"
    sides = "".join("v" if is_validation(d, 0.5, seed=3) else "t" for d in zh_docs[:24])
    assert sides == "vtvvvttttvtvtvtvvtttvtvv"

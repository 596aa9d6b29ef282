"""The BPE tokenizer: exact round trips in English and Chinese, byte fallback for rare characters,
fixed special ids, and the content-hash cache (reused, never retrained, trained once under
concurrency)."""

import pickle
import threading
from pathlib import Path

import fsspec
import pytest

from trainables import tokenizer as tokenizer_module
from trainables.corpus import iter_documents
from trainables.tokenizer import Tokenizer, train_tokenizer

DATA = Path(__file__).parents[1].parent / "shared" / "data"
SHAKESPEARE, FORTUNES = DATA / "tinyshakespeare.txt", DATA / "zh_fortunes.txt"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"test corpora absent: {DATA}")
VOCAB = 2000
# Chinese has thousands of distinct characters; at vocab 2000 only the commonest get ids.
COVERAGE = 0.99


@pytest.fixture(scope="module")
def docs():
    en = list(iter_documents(str(SHAKESPEARE), max_chars=300_000))
    zh = list(iter_documents(str(FORTUNES), max_chars=300_000))
    return en, zh


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return train_tokenizer(docs[0] + docs[1], VOCAB, cache, character_coverage=COVERAGE)


def test_special_ids_and_byte_pieces_are_fixed(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert [tok.piece(4), tok.piece(5)] == ["<用户>", "<AI>"]  # the reserved chat markers
    assert tok.piece(6) == "<0x00>" and tok.piece(261) == "<0xFF>"


def test_round_trip_is_exact_in_english_and_chinese(tok):
    en = list(iter_documents(str(SHAKESPEARE)))[-200:]  # text after the training slice
    zh = list(iter_documents(str(FORTUNES)))[-200:]
    for text, ids in zip(en + zh, tok.encode(en + zh), strict=True):
        assert tok.decode(ids) == text
        assert tok.unk_id not in ids


@pytest.mark.parametrize(
    "text",
    [
        "  two leading spaces\n\tand a tab\r\n\n\nthree newlines   ",
        "def f(x):\n        return x  # indented code",
        "\x00 control \x07 bytes",
        "ǅ e\u0301 ﬁ ① Ⅻ",  # would change under NFKC; identity normalization keeps them
    ],
)
def test_round_trip_keeps_whitespace_and_unnormalized_text(tok, text):
    assert tok.decode(tok.encode([text])[0]) == text


def test_rare_cjk_and_emoji_fall_back_to_utf8_bytes(tok):
    for char in ("𠀋", "😀", "龘"):  # none occurs in the training text
        ids = tok.encode([char])[0]
        assert ids == [6 + b for b in char.encode("utf-8")]  # byte b is piece 6 + b
        assert tok.decode(ids) == char


def test_digits_are_split_and_common_chinese_has_pieces(tok):
    assert [tok.piece(i) for i in tok.encode(["2024"])[0]] == ["2", "0", "2", "4"]
    assert len(tok.encode(["我们"])[0]) <= 2  # not six byte pieces


def test_decode_accepts_arrays_and_encode_rejects_a_bare_string(tok):
    import numpy as np
    import torch

    ids = tok.encode(["To be, or not to be"])[0]
    assert tok.decode(np.array(ids, dtype=np.uint16)) == tok.decode(torch.tensor(ids))
    with pytest.raises(TypeError, match=r"wrap a single text as \[text\]"):
        tok.encode("a string")


def test_pickle_round_trip(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.path == tok.path and again.sha256 == tok.sha256
    assert again.encode(["人之初，性本善"]) == tok.encode(["人之初，性本善"])


def test_cache_hit_reuses_the_file_without_training(docs, tmp_path, monkeypatch):
    first = train_tokenizer(docs[0], 600, tmp_path, seed=1)
    mtime = Path(first.path).stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this tokenizer")

    monkeypatch.setattr(tokenizer_module, "_train", must_not_train)
    again = train_tokenizer(iter(docs[0]), 600, tmp_path, seed=1)  # a generator: same content
    assert again.path == first.path and Path(again.path).stat().st_mtime_ns == mtime
    assert again.sha256 == first.sha256
    with pytest.raises(AssertionError, match="retrained"):  # another option is another key
        train_tokenizer(docs[0], 600, tmp_path, seed=2)


def test_concurrent_callers_train_once(docs, tmp_path, monkeypatch):
    calls = []
    real_train = tokenizer_module._train
    monkeypatch.setattr(tokenizer_module, "_train", lambda *a: calls.append(1) or real_train(*a))
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(train_tokenizer(docs[0], 600, tmp_path).path))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(paths) == 3 and len(set(paths)) == 1


def test_from_file_local_and_url(tok, tmp_path):
    local = Tokenizer.from_file(tok.path)
    assert local.path == tok.path and local.sha256 == tok.sha256
    fs = fsspec.filesystem("memory")
    try:
        fs.pipe("/models/tok.model", Path(tok.path).read_bytes())
        remote = Tokenizer.from_file("memory://models/tok.model", cache_dir=tmp_path)
    finally:
        fs.rm("/models", recursive=True)
    assert Path(remote.path).is_file() and Path(remote.path).is_relative_to(tmp_path)
    assert remote.sha256 == tok.sha256
    assert remote.encode(["O Romeo, Romeo!"]) == tok.encode(["O Romeo, Romeo!"])


def test_too_small_vocab_for_chinese_says_what_to_change(docs, tmp_path):
    with pytest.raises(ValueError, match="decrease character_coverage"):
        train_tokenizer(docs[1], 600, tmp_path)  # default coverage 0.9995
    with pytest.raises(ValueError, match="must exceed the 262 reserved ids"):
        train_tokenizer(docs[0], 262, tmp_path)

"""`prepare`: config validation, the store built once and reused, rebuilt when a source changes,
a given tokenizer, the embedded corpus, and reference bytes per token at vocab 4096."""

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from trainables import data as data_module
from trainables.corpus import EMBEDDED, iter_documents
from trainables.data import DataConfig, default_cache_dir, prepare

DATA = Path(__file__).parents[1].parent / "shared" / "data"
SHAKESPEARE, FORTUNES = DATA / "tinyshakespeare.txt", DATA / "zh_fortunes.txt"
needs_corpora = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"test corpora absent: {DATA}")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sources", ()),
        ("sources", ("",)),
        ("format", "csv"),
        ("text_field", ""),
        ("vocab_size", 260),
        ("vocab_size", 4096.0),
        ("val_fraction", 0.0),
        ("val_fraction", 1),
        ("character_coverage", 1.5),
        ("tokenizer", ""),
        ("max_chars", 0),
        ("seed", -1),
        ("seed", True),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}=.* is not allowed; expected"):
        DataConfig(**{field: value})


def test_config_accepts_lists_and_paths_and_keys_are_stable():
    cfg = DataConfig(sources=["a.txt", Path("b.jsonl")])
    assert cfg.sources == ("a.txt", "b.jsonl")
    assert DataConfig(sources="a.txt").sources == ("a.txt",)
    assert cfg.key() == DataConfig(sources=("a.txt", "b.jsonl")).key()
    assert cfg.key() != DataConfig(sources=("a.txt", "b.jsonl"), seed=1).key()
    assert DataConfig().sources == (EMBEDDED,)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SANDBOX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SANDBOX_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "minicpm-sandbox"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus" / "en.txt"
    path.parent.mkdir()
    shutil.copy(SHAKESPEARE, path)
    return path


def _never_read(*args, **kwargs):
    raise AssertionError("the corpus was read although the store is cached")


@needs_corpora
def test_prepare_twice_reuses_the_store_without_reading(corpus, tmp_path, monkeypatch):
    cfg = DataConfig(sources=(str(corpus),), vocab_size=600, val_fraction=0.05, max_chars=200_000)
    store = prepare(cfg, tmp_path / "cache")
    assert isinstance(store.train, np.memmap) and store.meta["vocab_size"] == 600
    assert 0.02 < store.meta["n_val_docs"] / (store.meta["n_train_docs"] + 1) < 0.09
    meta_mtime = (Path(store.root) / "meta.json").stat().st_mtime_ns
    monkeypatch.setattr(data_module, "iter_documents", _never_read)
    again = prepare(cfg, tmp_path / "cache")
    assert again.root == store.root and np.array_equal(again.val, store.val)
    assert (Path(store.root) / "meta.json").stat().st_mtime_ns == meta_mtime


@needs_corpora
def test_prepare_rebuilds_when_a_source_changes(corpus, tmp_path):
    cfg = DataConfig(sources=(str(corpus),), vocab_size=600, max_chars=100_000)
    first = prepare(cfg, tmp_path / "cache")
    corpus.write_text(corpus.read_text()[::-1])  # same size, new content and time
    second = prepare(cfg, tmp_path / "cache")
    assert second.root != first.root and second.meta["train_sha256"] != first.meta["train_sha256"]


@needs_corpora
def test_concurrent_prepare_builds_once(corpus, tmp_path, monkeypatch):
    builds = []
    real_build = data_module.build_token_store
    monkeypatch.setattr(
        data_module, "build_token_store", lambda *a: builds.append(1) or real_build(*a)
    )
    cfg = DataConfig(sources=(str(corpus),), vocab_size=600, max_chars=100_000)
    roots = []
    threads = [
        threading.Thread(target=lambda: roots.append(prepare(cfg, tmp_path).root)) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(roots) == 3 and len(set(roots)) == 1


@needs_corpora
def test_prepare_with_a_given_tokenizer(corpus, tmp_path):
    trained = prepare(
        DataConfig(sources=(str(corpus),), vocab_size=600, max_chars=100_000), tmp_path
    )
    model = trained.meta["tokenizer"]
    cfg = DataConfig(sources=(str(FORTUNES),), tokenizer=model, vocab_size=600, max_chars=50_000)
    store = prepare(cfg, tmp_path)
    assert store.meta["tokenizer_sha256"] == trained.meta["tokenizer_sha256"]
    with pytest.raises(ValueError, match="has 600 pieces but DataConfig.vocab_size=4096"):
        prepare(DataConfig(sources=(str(FORTUNES),), tokenizer=model, max_chars=50_000), tmp_path)


def test_embedded_corpus_smoke(tmp_path):
    cfg = DataConfig(vocab_size=512, val_fraction=0.1, max_chars=300_000)
    store = prepare(cfg, tmp_path)
    assert store.meta["train_bytes"] + store.meta["val_bytes"] >= 300_000  # ASCII, mostly
    assert store.meta["n_val_docs"] > 0 and len(store.train) > 50_000


def test_empty_split_says_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match=r"both must be non-empty: add data \(max_chars=300\)"):
        prepare(DataConfig(max_chars=300, val_fraction=0.01), tmp_path)


@needs_corpora
@pytest.mark.parametrize(
    ("path", "coverage", "low", "high"),
    [(SHAKESPEARE, 0.9995, 3.1, 3.5), (FORTUNES, 0.995, 3.2, 3.8)],
)
def test_reference_bytes_per_token_at_vocab_4096(tmp_path, path, coverage, low, high):
    """Held-out UTF-8 bytes per token of the whole corpus at vocab 4096 (3.29 en, 3.48 zh)."""
    cfg = DataConfig(sources=(str(path),), character_coverage=coverage)
    store = prepare(cfg, tmp_path)
    assert low < store.val_bytes_per_token < high
    n_docs = store.meta["n_train_docs"] + store.meta["n_val_docs"]
    assert n_docs == len(list(iter_documents(str(path))))

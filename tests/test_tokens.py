"""The token store and its batches: exact contents, read-only memory maps, batches that depend on
(seed, step) only, contiguous validation windows, and bits per byte."""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.corpus import iter_documents, split_documents
from trainables.tokenizer import train_tokenizer
from trainables.tokens import (
    TokenStore,
    bits_per_byte,
    build_token_store,
    sample_batch,
    token_dtype,
    val_batches,
)

DATA = Path(__file__).parents[1].parent / "shared" / "data"
SHAKESPEARE, FORTUNES = DATA / "tinyshakespeare.txt", DATA / "zh_fortunes.txt"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"test corpora absent: {DATA}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    docs = list(iter_documents([str(SHAKESPEARE), str(FORTUNES)], max_chars=400_000))
    docs = docs[:1500] + list(iter_documents(str(FORTUNES), max_chars=150_000))
    train, val = split_documents(docs, 0.1)
    tok = train_tokenizer(train, 1500, tmp, character_coverage=0.99)
    return build_token_store(train, val, tok, tmp / "tokens" / "store"), tok, train, val


def _documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos_id)
    return np.split(np.asarray(tokens), ends + 1)[:-1]


def test_store_holds_every_document_then_eos(built):
    store, tok, train, val = built
    for tokens, docs in ((store.train, train), (store.val, val)):
        assert tokens[-1] == tok.eos_id
        pieces = _documents(tokens, tok.eos_id)
        assert [tok.decode(p[:-1]) for p in pieces] == docs
    meta = store.meta
    assert meta["n_train_tokens"] == len(store.train) and meta["n_val_docs"] == len(val)
    assert meta["val_bytes"] == sum(len(d.encode()) for d in val)
    assert meta["train_bytes"] == sum(len(d.encode()) for d in train)
    assert meta["tokenizer"] == tok.path and meta["tokenizer_sha256"] == tok.sha256
    assert store.val_bytes_per_token == meta["val_bytes"] / meta["n_val_tokens"]


def test_open_maps_read_only_and_pickles_as_a_reopen(built):
    store = TokenStore.open(built[0].root)
    assert isinstance(store.train, np.memmap) and isinstance(store.val, np.memmap)
    assert store.train.dtype == np.uint16 and store.train.mode == "r"
    with pytest.raises(ValueError, match="read-only"):
        store.train[0] = 1
    again = pickle.loads(pickle.dumps(store))
    assert isinstance(again.train, np.memmap) and np.array_equal(again.val, store.val)
    assert len(pickle.dumps(store)) < 1000  # the path travels, not the tokens


def test_build_leaves_no_temporary_folder_and_needs_both_splits(built, tmp_path):
    store, tok, train, _ = built
    assert [p.name for p in Path(store.root).parent.iterdir()] == ["store"]
    with pytest.raises(ValueError, match="the val split has no documents"):
        build_token_store(train[:10], [], tok, tmp_path / "empty-val")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a complete token store"):
        TokenStore.open(tmp_path)


def test_dtype_fits_the_vocabulary():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_sample_batch_depends_on_seed_and_step_only():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 3, 4, seed=0, step=0)
    assert x.dtype == torch.int64 and x.shape == (3, 4) and y.shape == (3, 4)
    # Reference starts: PCG64([seed, step]) is specified, so these hold on any machine.
    assert x[:, 0].tolist() == [847, 634, 509]
    assert sample_batch(tokens, 3, 4, seed=1, step=7)[0][:, 0].tolist() == [774, 358, 513]
    assert torch.equal(sample_batch(tokens, 3, 4, seed=0, step=0)[0], x)
    assert not torch.equal(sample_batch(tokens, 3, 4, seed=0, step=1)[0], x)
    assert not torch.equal(sample_batch(tokens, 3, 4, seed=1, step=0)[0], x)


def test_sample_batch_windows_are_contiguous_and_y_is_shifted():
    tokens = np.arange(50, dtype=np.uint32)
    for step in range(20):
        x, y = sample_batch(tokens, 8, 49, seed=0, step=step)  # only starts 0 and 1 fit
        assert torch.equal(x, x[:, :1] + torch.arange(49)) and torch.equal(y, x + 1)
        assert int(y.max()) <= 49
    with pytest.raises(ValueError, match="cannot fill a window"):
        sample_batch(tokens, 1, 50, seed=0, step=0)


def test_val_batches_are_contiguous_in_order_and_capped():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(val_batches(tokens, 4, 100))
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # 10 windows, the last batch short
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(xs, torch.arange(1000)) and torch.equal(ys, xs + 1)
    capped = list(val_batches(tokens, 4, 100, max_tokens=550))
    assert sum(x.numel() for x, _ in capped) == 500
    with pytest.raises(ValueError, match="give no window"):
        list(val_batches(tokens, 4, 100, max_tokens=50))


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1000, 1000) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 1000, 4000) == pytest.approx(0.7213475204444817)
    with pytest.raises(ValueError, match="must both be positive"):
        bits_per_byte(2.0, 0, 10)

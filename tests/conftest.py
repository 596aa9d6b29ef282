"""Shared fixtures: one local Ray instance per test session, a private cache, the real corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tokenizers and token stores go to a session folder, never the user's cache."""
    cache = tmp_path_factory.mktemp("sandbox-cache")
    old = os.environ.get("SANDBOX_CACHE")
    os.environ["SANDBOX_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_SILENT", "true")
    yield cache
    if old is None:
        os.environ.pop("SANDBOX_CACHE", None)
    else:
        os.environ["SANDBOX_CACHE"] = old


@pytest.fixture(scope="session")
def ray_local(private_cache):
    """A private local Ray (never joins another instance on the machine); shut down at the end."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"the test corpora folder {SHARED_DATA} is absent (it ships beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_store(private_cache):
    """A real token store: tinyshakespeare when the shared corpora exist, else the stdlib corpus."""
    from trainables.corpus import EMBEDDED
    from trainables.data import DataConfig, prepare

    corpus = SHARED_DATA / "tinyshakespeare.txt"
    source = str(corpus) if corpus.exists() else EMBEDDED
    return prepare(DataConfig(sources=(source,), vocab_size=512, max_chars=300_000))


def without_chat_pieces(tok):
    """`tok` less its reserved chat markers (their ids close up): a tokenizer from elsewhere."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from trainables.tokenizer import CHAT_PIECES, Tokenizer

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    kept = [p for p in proto.pieces if p.piece not in CHAT_PIECES]
    del proto.pieces[:]
    proto.pieces.extend(kept)
    return Tokenizer(proto.SerializeToString(), f"{tok.path}-without-chat")

"""Sampling: the cached forward equals the full forward, decoding is deterministic per seed."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import without_chat_pieces
from torch import nn

from trainables.artifact import save_model_dir
from trainables.corpus import EMBEDDED, iter_documents
from trainables.generate import (
    KVCache,
    Sampling,
    cached_forward,
    filter_top_k,
    filter_top_p,
    generate,
    generate_from_dir,
    generate_ids,
    next_token,
    prompt_to_ids,
    stop_ids,
    supports_cache,
)
from trainables.model import MiniCPM
from trainables.shapes import get_config
from trainables.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models decode token by token: on a shared machine one thread is many times faster
    than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    docs = list(itertools.islice(iter_documents([EMBEDDED]), 200))
    return train_tokenizer(docs, 512, tmp_path_factory.mktemp("tok"))


def _model(name: str = "micro-64", seed: int = 0, **overrides) -> MiniCPM:
    """A random model with norm gains off 1 and a short window, so the window slides soon."""
    torch.manual_seed(seed)
    model = MiniCPM(get_config(name, **({"vocab_size": 512, "max_seq_len": 32} | overrides)))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


class RoundedLinear(nn.Module):
    """A stand-in for a GPTQ QuantLinear: int8 codes and per-row scales, dequantized in forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.register_buffer("scale", w.abs().amax(dim=1, keepdim=True) / 127)
        self.register_buffer("codes", torch.round(w / self.scale).to(torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.codes.float() * self.scale)


def _quantize(model: MiniCPM) -> MiniCPM:
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, RoundedLinear(child))
    return model


MODELS = {
    "mha": lambda: _model("micro-64"),
    "gqa": lambda: _model("micro-128", n_kv_heads=2),
    "quantized": lambda: _quantize(_model("micro-64", n_kv_heads=1)),
}


# --- the cached forward -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_cached_forward_equals_the_full_forward(kind):
    """Prefill 7, then single tokens, then a chunk of 5 (the masked case): every position's
    logits equal the full recompute's."""
    model = MODELS[kind]()
    assert supports_cache(model)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(3))
    cache = KVCache(len(model.layers), model.cfg.max_seq_len)
    with torch.no_grad():
        full = model(ids)
        chunks = [cached_forward(model, ids[:, a:b], cache) for a, b in _chunks()]
    assert cache.length == 32
    delta = (torch.cat(chunks, dim=1) - full).abs().max().item()
    assert delta < 1e-5, f"max |Δlogits| = {delta:.3g}"


def _chunks() -> list[tuple[int, int]]:
    return [(0, 7), *[(i, i + 1) for i in range(7, 27)], (27, 32)]


def test_the_cache_refuses_positions_beyond_the_window():
    model = _model()
    cache = KVCache(len(model.layers), 32)
    with torch.no_grad():
        cached_forward(model, torch.zeros(1, 30, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="beyond max_seq_len=32"):
            cached_forward(model, torch.zeros(1, 3, dtype=torch.long), cache)


@pytest.mark.parametrize("kind", MODELS)
def test_cached_decoding_equals_recomputing_past_the_window(kind):
    """45 new tokens after a 10-token prompt: the 32-token window slides 23 times."""
    model = MODELS[kind]()
    prompt = list(range(100, 110))
    for temperature in (0.0, 0.8):
        args = dict(max_new_tokens=45, temperature=temperature, seed=5)
        cached = generate_ids(model, prompt, **args)
        assert cached == generate_ids(model, prompt, use_cache=False, **args)
        assert len(cached) == 45


def test_a_model_without_the_layout_is_decoded_by_recomputing():
    class Wrapped(nn.Module):  # the MiniCPM call interface, not its module layout
        def __init__(self, inner: MiniCPM):
            super().__init__()
            self.inner, self.cfg = inner, inner.cfg

        def forward(self, idx):
            return self.inner(idx)

    model = _model()
    assert not supports_cache(Wrapped(model))
    args = dict(max_new_tokens=40, temperature=0.0)
    assert generate_ids(Wrapped(model), [5, 6], **args) == generate_ids(model, [5, 6], **args)


# --- choosing tokens ----------------------------------------------------------------------------


def test_greedy_takes_the_argmax_of_the_full_forward():
    model = _model()
    prompt = [7, 8, 9]
    ids = generate_ids(model, prompt, max_new_tokens=3, temperature=0.0)
    for token in ids:
        with torch.no_grad():
            assert token == int(model(torch.tensor([prompt]))[0, -1].argmax())
        prompt.append(token)


def test_seeded_sampling_is_deterministic_and_the_seed_matters():
    model = _model()
    a = generate_ids(model, [1, 2], max_new_tokens=30, temperature=1.0, seed=1)
    assert a == generate_ids(model, [1, 2], max_new_tokens=30, temperature=1.0, seed=1)
    assert a != generate_ids(model, [1, 2], max_new_tokens=30, temperature=1.0, seed=2)
    greedy = generate_ids(model, [1, 2], max_new_tokens=30, temperature=0.0)
    assert generate_ids(model, [1, 2], max_new_tokens=30, top_k=1, seed=9) == greedy


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda x: torch.isfinite(x).nonzero().flatten().tolist()
    assert kept(filter_top_k(logits, 2)) == [0, 1]
    assert kept(filter_top_k(logits, 9)) == [0, 1, 2, 3]
    assert kept(filter_top_p(logits, 0.8)) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_top_p(logits, 0.81)) == [0, 1, 2]
    assert kept(filter_top_p(logits, 0.1)) == [0]  # the likeliest token always stays
    shuffled = logits[[2, 0, 3, 1]]
    assert kept(filter_top_p(shuffled, 0.8)) == [1, 3]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    draws = [next_token(logits, Sampling(1.0, top_p=0.8), g) for _ in range(4000)]
    share = draws.count(0) / len(draws)
    assert set(draws) == {0, 1}
    assert abs(share - 0.5 / 0.8) < 4 * math.sqrt(0.625 * 0.375 / 4000)  # 4 sigma


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_settings_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"Sampling.{field}="):
        Sampling(**kwargs)


def test_bad_prompts_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [])
    with pytest.raises(ValueError, match=r"\[512\] are outside"):
        generate_ids(model, [1, 512])
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate_ids(model, [1], max_new_tokens=-1)


def test_a_stop_id_ends_the_sample_without_itself():
    model = _model()
    free = generate_ids(model, [3, 4], max_new_tokens=20, temperature=0.0)
    stop = free[5]
    stopped = generate_ids(model, [3, 4], max_new_tokens=20, temperature=0.0, stop_ids={stop})
    assert stopped == free[: free.index(stop)]


# --- text and folders ---------------------------------------------------------------------------


def test_text_generation_decodes_the_sampled_ids(tok):
    model = _model()
    prompt = tok.encode(["import os"])[0]
    assert prompt_to_ids(tok, "import os") == prompt
    assert prompt_to_ids(tok, "") == [tok.eos_id]  # a document's start in the token stream
    ids = generate_ids(model, prompt, max_new_tokens=20, seed=3, stop_ids={tok.eos_id})
    assert generate(model, tok, "import os", max_new_tokens=20, seed=3) == tok.decode(ids)
    assert generate(model, tok, prompt, max_new_tokens=20, seed=3) == tok.decode(ids)
    assert stop_ids(tok, stop_at_eos=True, chat=False) == {tok.eos_id}
    assert stop_ids(tok, stop_at_eos=False, chat=True) == set()


def test_chat_wraps_the_prompt_as_a_user_turn(tok):
    chat = pytest.importorskip("trainables.chat", reason="chat prompts need trainables.chat")
    chat_tok = chat.add_chat_tokens(tok)
    user_id, ai_id = chat.chat_token_ids(chat_tok)
    ids = prompt_to_ids(chat_tok, "Hi", chat=True)
    assert ids == [chat_tok.bos_id, user_id, *tok.encode(["Hi"])[0], ai_id]
    assert stop_ids(chat_tok, stop_at_eos=True, chat=True) == {chat_tok.eos_id, user_id}
    model = _model(vocab_size=chat_tok.vocab_size)
    text = generate(model, chat_tok, "Hi", chat=True, max_new_tokens=10, temperature=0.0)
    assert chat.USER not in text
    with pytest.raises(chat.ChatFormatError, match="add_chat_tokens"):
        prompt_to_ids(without_chat_pieces(tok), "Hi", chat=True)


def test_generate_from_a_model_folder(tmp_path, tok):
    model = _model()
    save_model_dir(tmp_path / "m", model, tok, stage="sft")
    args = dict(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=4)
    assert generate_from_dir(tmp_path / "m", "def f", **args) == generate(
        model, tok, "def f", **args
    )


def test_generate_from_a_gptq_folder(tmp_path, tok):
    quantized = pytest.importorskip("trainables.quantized", reason="GPTQ folders need it")
    gptq = pytest.importorskip("trainables.gptq", reason="the test quantizes with rtn_quantize")
    qcfg = quantized.QuantConfig()
    model = _model(n_kv_heads=1)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            qw = gptq.rtn_quantize(module.weight.detach(), qcfg)
            quantized.replace_module(model, name, quantized.QuantLinear.from_quantized(qw))
    quantized.save_quantized(tmp_path / "q", model, tok, qcfg)
    args = dict(max_new_tokens=40, temperature=0.9, seed=6)
    text = generate_from_dir(tmp_path / "q", "class A", **args)
    assert text == generate(model, tok, "class A", use_cache=False, **args)

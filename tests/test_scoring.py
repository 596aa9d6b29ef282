"""Scoring: option likelihoods, length normalisation, greedy decoding, answer extraction, best mode.

A bigram model with hand-set probabilities makes every expected pick and log-probability a hand
computation; a real micro MiniCPM checks that batching and padding do not change scores.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainables.model import MiniCPM
from trainables.scoring import (
    argmax,
    best_mode,
    continuation_logprobs,
    exact_match,
    extract_letter,
    extract_number,
    first_line,
    greedy_generate,
    length_normalised,
    numbers_equal,
    score_task,
    summarise,
)
from trainables.shapes import get_config
from trainables.tasks import GenItem, MCItem, Task

ALPHABET = " \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:?.#+-*()"
EOS = 2


class CharTokenizer:
    """One id per character (ids 0-3 special, as in trainables.tokenizer)."""

    eos_id = EOS
    vocab_size = 4 + len(ALPHABET)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[4 + ALPHABET.index(c) for c in t] for t in texts]

    def decode(self, ids) -> str:
        return "".join(ALPHABET[int(i) - 4] for i in ids if int(i) >= 4)


class BigramLM(nn.Module):
    """logits[b, t] = table[ids[b, t]]: p(next | previous token) set row by row."""

    def __init__(self, vocab_size: int = CharTokenizer.vocab_size, max_seq_len: int = 64):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.table = nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[idx]  # (B, T, V)

    @torch.no_grad()
    def set(self, prev: str, probs: dict[str | int, float]) -> None:
        """Row `prev` as exact log-probabilities; the rest of the mass spread evenly."""
        ids = {(k if isinstance(k, int) else 4 + ALPHABET.index(k)): p for k, p in probs.items()}
        v = self.table.shape[0]
        rest = (1.0 - sum(ids.values())) / (v - len(ids))
        row = torch.full((v,), math.log(rest), dtype=torch.float64)
        for i, p in ids.items():
            row[i] = math.log(p)
        self.table[4 + ALPHABET.index(prev)] = row.float()


def mc_task(*items: MCItem) -> Task:
    return Task("t", "mc", items, (), "letter", 4, ("\n",), "test")


def test_the_most_likely_option_is_picked_with_its_hand_computed_logprob():
    model, tok = BigramLM(), CharTokenizer()
    model.set(":", {" ": 0.9})
    model.set(" ", {"x": 0.1, "y": 0.3, "z": 0.2, "B": 0.35})
    model.set("B", {"\n": 0.9})
    ctx = tok.encode(["Question: q\nAnswer:"])[0]
    options = tok.encode([" x", " y", " z"])
    lps = continuation_logprobs(model, [(ctx, o) for o in options], batch_size=2, max_len=64)
    expected = [math.log(0.9) + math.log(p) for p in (0.1, 0.3, 0.2)]
    assert lps == pytest.approx(expected, abs=1e-5)
    r = score_task(model, tok, mc_task(MCItem("q", ("x", "y", "z"), 1)))
    assert r["loglik"] == r["loglik_norm"] == r["generate"] == 1.0  # " B\n" is generated
    assert r["chosen_mode"] == "loglik" and r["n"] == 1


def test_length_normalisation_changes_the_pick():
    # " a": ln .9 + ln .5 = -0.80 (2 bytes: -0.40/byte); " bbbb": ln .9 + ln .4 + 3 ln .9 =
    # -1.34 (5 bytes: -0.27/byte). The sum picks "a", the per-byte score picks "bbbb".
    model, tok = BigramLM(), CharTokenizer()
    model.set(":", {" ": 0.9})
    model.set(" ", {"a": 0.5, "b": 0.4})
    model.set("b", {"b": 0.9})
    r = score_task(model, tok, mc_task(MCItem("q", ("a", "bbbb"), 1)))
    assert (r["loglik"], r["loglik_norm"], r["generate"]) == (0.0, 1.0, 0.0)
    assert (r["best"], r["chosen_mode"]) == (1.0, "loglik_norm")
    assert length_normalised(-1.0, " ab") == pytest.approx(-1 / 3)
    assert length_normalised(-1.0, " é", unit="bytes") == pytest.approx(-1 / 3)
    assert length_normalised(-1.0, " é", unit="chars") == pytest.approx(-1 / 2)


def test_generation_tasks_are_checked_as_numbers_or_exact_first_lines():
    model, tok = BigramLM(), CharTokenizer()
    model.set(":", {" ": 0.9})
    model.set(" ", {"4": 0.9})
    model.set("4", {"2": 0.9})
    model.set("2", {"\n": 0.9})
    items = (GenItem("What is 40 + 2?", "42"), GenItem("What is 4 * 4?", "16"))
    number = Task("n", "gen", items, (), "number", 8, ("\n",), "test")
    r = score_task(model, tok, number)
    assert r == {"generate": 0.5, "best": 0.5, "chosen_mode": "generate", "n": 2, "shots": 0}
    exact = Task(
        "e", "gen", (GenItem("q", "42.0"), GenItem("q", "42")), (), "exact", 8, ("\n",), "t"
    )
    assert score_task(model, tok, exact)["generate"] == 0.5  # exact: "42" != "42.0"


def test_greedy_decoding_follows_the_argmax_and_stops_at_eos_or_stop():
    model, tok = BigramLM(), CharTokenizer()
    model.set("a", {"b": 0.9})
    model.set("b", {"c": 0.9})
    model.set("c", {EOS: 0.9})
    prompts = tok.encode(["xa", "b", "zzc"])
    out = greedy_generate(model, prompts, max_new_tokens=5, eos_id=EOS, max_len=16)
    assert [tok.decode(o) for o in out] == ["bc", "c", ""]
    stopped = greedy_generate(
        model, prompts[:1], max_new_tokens=5, eos_id=EOS, max_len=16, stop=lambda ids: len(ids) > 0
    )
    assert tok.decode(stopped[0]) == "b"


@pytest.fixture(scope="module")
def micro() -> MiniCPM:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_config("micro-32"), vocab_size=300, max_seq_len=32)
    return MiniCPM(cfg).eval()


def test_batching_and_padding_do_not_change_a_real_models_scores(micro):
    g = torch.Generator().manual_seed(1)
    pairs = [
        (
            torch.randint(4, 300, (n,), generator=g).tolist(),
            torch.randint(4, 300, (k,), generator=g).tolist(),
        )
        for n, k in [(3, 1), (9, 4), (5, 2), (40, 3), (1, 1)]
    ]
    one = continuation_logprobs(micro, pairs, batch_size=1, max_len=32)
    many = continuation_logprobs(micro, pairs, batch_size=4, max_len=32)
    assert many == pytest.approx(one, abs=1e-4)
    prompts = [p for p, _ in pairs]
    a = greedy_generate(micro, prompts, max_new_tokens=6, eos_id=EOS, max_len=32, batch_size=1)
    b = greedy_generate(micro, prompts, max_new_tokens=6, eos_id=EOS, max_len=32, batch_size=8)
    uncached = greedy_generate(
        micro, prompts, max_new_tokens=6, eos_id=EOS, max_len=32, batch_size=8, use_cache=False
    )
    assert a == b == uncached and all(len(x) <= 6 for x in a)


def test_a_context_longer_than_the_window_is_cut_from_the_left():
    model, tok = BigramLM(max_seq_len=8), CharTokenizer()
    model.set("q", {"x": 0.25})
    ctx = tok.encode(["a" * 30 + "q"])[0]
    lp = continuation_logprobs(model, [(ctx, tok.encode(["x"])[0])], batch_size=1, max_len=8)
    assert lp == pytest.approx([math.log(0.25)], abs=1e-6)
    with pytest.raises(ValueError, match="exceeds max_len"):
        continuation_logprobs(model, [(ctx, [5] * 9)], batch_size=1, max_len=8)


@pytest.mark.parametrize(
    "text, n, expected",
    [
        (" B\n", 4, 1),
        ("Answer: C", 4, 2),
        ("the answer is (D) because", 4, 3),
        ("A cat", 2, 0),
        ("I think so", 4, None),
        (" E", 4, None),
        ("Because", 4, None),
        ("answer is a dog", 4, None),
    ],
)
def test_letter_extraction(text, n, expected):
    assert extract_letter(text, n) == expected


def test_number_extraction_and_comparison():
    assert extract_number("so 3 + 4 = 7.") == "7"
    assert extract_number("She pays $1,234 ... #### 1,234\nmore 5") == "1234"
    assert extract_number("no digits here") is None
    assert numbers_equal("42", "42.0") and numbers_equal("$5", "5")
    assert not numbers_equal("41", "42") and not numbers_equal(None, "1")
    assert first_line("\n  foo bar \nbaz") == "foo bar"
    assert exact_match(" foo  bar", "foo bar") and not exact_match("Foo", "foo")


def test_best_mode_is_the_max_with_ties_in_mode_order():
    assert best_mode({"loglik": 0.3, "loglik_norm": 0.5, "generate": 0.4}) == ("loglik_norm", 0.5)
    assert best_mode({"generate": 0.5, "loglik": 0.5}) == ("loglik", 0.5)
    assert argmax([1.0, 3.0, 3.0]) == 1
    s = summarise({"loglik": [True, False], "generate": [True, True]})
    assert s == {"loglik": 0.5, "generate": 1.0, "best": 1.0, "chosen_mode": "generate", "n": 2}
    with pytest.raises(ValueError, match="same non-zero number"):
        summarise({"loglik": [True], "generate": [True, False]})

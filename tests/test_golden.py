"""Golden loss curves: the trainer's numerics stay put while the step gets faster.

Each case trains a tiny μP model on a synthetic token stream (a deterministic Markov chain made
by an integer LCG, so the data is identical on every machine and numpy version) and compares the
reported train and validation losses at every evaluation with a curve recorded under
tests/data/golden/ before any speed work. A speed change that alters the loss by more than the
tolerance fails here; a deliberate numerics change re-records the fixture and says why.

    python tests/test_golden.py --record      # rewrite the fixtures (only for a deliberate change)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.schedules import ScheduleConfig
from trainables.shapes import get_config
from trainables.tokens import TokenStore
from trainables.trainer import TrainConfig, train

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
VOCAB = 256
# fp32 on one thread is bit-reproducible; the tolerance leaves room only for a different but
# equivalent summation order (e.g. a chunked cross-entropy), not for a changed computation.
# bf16 autocast rounds every matmul output, so reordering moves it a little more.
TOLERANCE = {"fp32": 2e-5, "bf16": 2e-3}
CASES = {
    "micro32_fp32": ({"preset": "micro-32"}, "fp32"),
    "micro64_gqa_fp32": ({"preset": "micro-64", "n_kv_heads": 1}, "fp32"),
    "micro32_bf16": ({"preset": "micro-32"}, "bf16"),
}


def lcg(state: int) -> int:
    """One step of a 32-bit linear congruential generator (Numerical Recipes' constants)."""
    return (1664525 * state + 1013904223) % 2**32


def markov_tokens(n: int, seed: int, branching: int = 4) -> np.ndarray:
    """n tokens of a first-order Markov chain (entropy ln 4 nats/token): each token has four
    successors, fixed for every stream; `seed` picks the walk. Integer arithmetic only, so the
    stream is the same on every machine and numpy version."""
    state, successors = 12345, []
    for _ in range(VOCAB * branching):
        state = lcg(state)
        successors.append(state % VOCAB)
    table = np.array(successors, dtype=np.int64).reshape(VOCAB, branching)
    out = np.empty(n, dtype=np.uint16)
    state, token = seed, 0
    for i in range(n):
        state = lcg(state)
        token = int(table[token, state >> 30])  # the top two bits pick one of four successors
        out[i] = token
    return out


def synthetic_store() -> TokenStore:
    train_ids, val_ids = markov_tokens(40_000, seed=1), markov_tokens(4_000, seed=2)
    meta = {"vocab_size": VOCAB, "n_val_tokens": len(val_ids), "val_bytes": 2 * len(val_ids)}
    return TokenStore("synthetic", train_ids, val_ids, meta)


def train_config(precision: str) -> TrainConfig:
    return TrainConfig(
        tokens=60 * 8 * 32,  # 60 steps
        batch_size=8,
        seq_len=32,
        lr=0.01,
        eval_every=10,
        eval_tokens=1024,
        precision=precision,
        threads=1,
        schedule=ScheduleConfig(kind="wsd", warmup_steps=6, decay_fraction=0.2),
    )


def run_case(name: str) -> dict:
    model, precision = CASES[name]
    overrides = {k: v for k, v in model.items() if k != "preset"}
    cfg = get_config(model["preset"], vocab_size=VOCAB, max_seq_len=32, **overrides)
    reports: list[dict] = []
    train(cfg, train_config(precision), synthetic_store(), report=lambda m, _: reports.append(m))
    keys = ("step", "train_loss", "val_loss")
    return {"curve": [{k: m[k] for k in keys} for m in reports], "torch": torch.__version__}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_curve_matches_the_golden_record(name):
    path = GOLDEN / f"{name}.json"
    golden = json.loads(path.read_text())
    got = run_case(name)["curve"]
    assert [p["step"] for p in got] == [p["step"] for p in golden["curve"]]
    tol = TOLERANCE[CASES[name][1]]
    for mine, ref in zip(got, golden["curve"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert mine[key] == pytest.approx(ref[key], rel=tol), (name, mine["step"], key)
    # the curve is a real learning curve, not a constant that any code would reproduce
    assert golden["curve"][-1]["val_loss"] < golden["curve"][0]["val_loss"] - 0.5


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_cross_entropy_equals_the_full_logits_one(monkeypatch, autocast):
    """Several chunks, ignored targets: loss and gradients as F.cross_entropy on full logits."""
    from trainables import model

    monkeypatch.setattr(model, "CE_CHUNK_LOGITS", 64 * 500)
    monkeypatch.setattr(model, "CE_MIN_ROWS", 1)  # 64 rows per chunk: 5 chunks of 300 rows
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(300, 24, generator=gen).requires_grad_()
    w = (torch.randn(500, 24, generator=gen) * 0.2).requires_grad_()
    targets = torch.randint(0, 500, (300,), generator=gen)
    targets[::7] = model.IGNORE_INDEX
    results = []
    for loss_fn in (
        lambda: torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(h, w).float(), targets
        ),
        lambda: model.linear_cross_entropy(h, w, targets),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        h_grad, w_grad = torch.autograd.grad(3 * loss, (h, w))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            no_grad_loss = loss_fn()
        results.append((loss.detach(), no_grad_loss, h_grad, w_grad))
    (ref, ref_ng, ref_h, ref_w), (got, got_ng, got_h, got_w) = results
    tol = 2e-2 if autocast else 1e-5  # bf16: the 1/n scale is applied after rounding
    assert got == pytest.approx(ref.item(), rel=1e-6) and got_ng == pytest.approx(ref_ng.item())
    assert (got_h - ref_h).abs().max() <= tol * ref_h.abs().max()
    assert (got_w - ref_w).abs().max() <= tol * ref_w.abs().max()


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA
def test_cpu_bf16_attention_is_fp32_attention_rounded(n_kv_heads):
    """bf16 attention on a CPU runs fp32 kernels: output and gradients within bf16 rounding of
    fp32 SDPA on the same inputs."""
    from trainables.model import _CpuBf16Attention

    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 16, 8), (2, n_kv_heads, 16, 8), (2, n_kv_heads, 16, 8)]
    q, k, v = (torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in shapes)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    grad = torch.randn(ref.shape, generator=gen)
    y = _CpuBf16Attention.apply(q, k, v)
    assert y.dtype == torch.bfloat16 and (y.float() - ref).abs().max() < 2e-2
    for got, want in zip(
        torch.autograd.grad(y, (q, k, v), grad.bfloat16()),
        torch.autograd.grad(ref, (q, k, v), grad),
        strict=True,
    ):
        assert (got.float() - want).abs().max() < 2e-2 * max(1.0, want.abs().max().item())


def _record() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name in sorted(CASES):
        record = run_case(name)
        (GOLDEN / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(name, [round(p["val_loss"], 4) for p in record["curve"]])


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        _record()
    else:
        sys.exit(f"usage: python {sys.argv[0]} --record")

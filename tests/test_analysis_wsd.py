"""The wsd analysis on a synthetic branching study: decays vs cosine, and compute accounting."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from sandbox_service.analysis import analyze
from sandbox_service.spec import SpecError, parse_spec

RAW = {
    "name": "wsd-synth",
    "question": "q",
    "model": {"preset": "micro-32"},
    "data": {"vocab_size": 512},
    "train": {"tokens": 1000, "batch_size": 2, "seq_len": 8, "schedule": {"warmup_steps": 1}},
    "search": {"space": {"train.lr": {"grid": [0.01]}}},
    "branching": {"steps": [10, 20], "decay_fractions": [0.1, 0.2], "decay_shapes": ["exp"]},
    "analysis": {"kind": "wsd"},
}
TPS = 16  # tokens per step


def synthetic():
    """Loss 5/sqrt(step); a decay of fraction f ends 0.3·f lower than cosine of its length."""
    rows, hist = [], []

    def add(tid, phase, step, own_steps, loss, **branch):
        rows.append(
            {
                "trial_id": tid,
                "status": "completed",
                "config/train/lr": 0.01,
                "branch/phase": phase,
                **{f"branch/{k}": v for k, v in branch.items()},
                "step": step,
                "tokens": step * TPS,
                "own_tokens": own_steps * TPS,
                "flops": step * TPS * 100.0,
                "own_flops": own_steps * TPS * 100.0,
                "val_loss": loss,
                "diverged": False,
                "completed": True,
            }
        )
        hist.append({"trial_id": tid, "tokens": step * TPS, "val_loss": loss, "diverged": False})

    add("s", "stable", 20, 20, 5 / 20**0.5)
    for s in (10, 20):
        d = round(0.1 * s / 0.9)
        add(
            f"c{s}",
            "cosine",
            s + d,
            s + d,
            5 / (s + d) ** 0.5,
            stable_trial="s",
            stable_step=s,
            decay_fraction=0.1,
            decay_shape="cosine",
        )
        for f in (0.1, 0.2):
            d = round(f * s / (1 - f))
            add(
                f"d{s}-{f}",
                "decay",
                s + d,
                d,
                5 / (s + d) ** 0.5 - 0.3 * f,
                stable_trial="s",
                stable_step=s,
                decay_fraction=f,
                decay_shape="exp",
            )
    return pd.DataFrame(rows), pd.DataFrame(hist)


def test_decays_compare_with_cosine_and_compute_is_accounted():
    spec = parse_spec(copy.deepcopy(RAW))
    trials, history = synthetic()
    result = analyze(spec, trials, history)
    head = result.summary["headline"]
    assert head["wsd - cosine, 10.0% exp (mean over S)"] == pytest.approx(-0.03)
    compute = result.summary["compute"]
    stable_and_decays = (20 + 1 + 2 + 2 + 5) * TPS * 100.0  # stable once, then only the decays
    assert compute["wsd_total_flops"] == pytest.approx(stable_and_decays)
    assert compute["cosine_total_flops"] == pytest.approx((11 + 22) * TPS * 100.0)
    assert set(result.figures) == {"wsd_curves", "wsd_final_vs_compute"}


def test_wsd_analysis_needs_branching():
    raw = copy.deepcopy(RAW)
    del raw["branching"]
    with pytest.raises(SpecError, match="wsd needs a branching"):
        parse_spec(raw, "x.yaml")

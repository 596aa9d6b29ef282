"""The analyses recover known laws from synthetic study tables, and validate() names the bad key.

Studies are built without Ray: trials.csv / history.csv frames whose losses follow a chosen law
exactly (plus seeded noise where stated), so every number the analysis reports has a reference.
The builders are shared with test_report.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from sandbox_service.analysis import KINDS, analyze, validate
from sandbox_service.analysis.batch_size import auto_targets
from sandbox_service.spec import parse_spec
from trainables.dictconfig import ConfigError
from trainables.shapes import flops_per_token, get_config, non_embedding_params

VOCAB = 1024
SEQ_LEN = 32
LR_GRID = np.geomspace(1e-3, 1e-1, 9)
WIDTHS = (32, 64, 128, 256)
BS_A, BS_B = 1.5e6, 6.0  # synthetic batch-size law: bs* = a / L^b (tokens per step)
ALPHA, BETA = 0.29, 0.23  # MiniCPM's L(N, D) exponents


# --- builders ---------------------------------------------------------------------------------


def spec_with(space: dict, analysis: dict | None = None, *, algorithm: str = "grid"):
    raw = {
        "name": "synthetic",
        "question": "Does the synthetic law come back out?",
        "model": {"preset": "micro-32", "max_seq_len": 64},
        "data": {"sources": ["embedded:python-stdlib"], "vocab_size": VOCAB},
        "train": {"tokens": 100_000, "batch_size": 8, "seq_len": SEQ_LEN, "lr": 0.01},
        "search": {"algorithm": algorithm, "space": space},
    }
    return parse_spec({**raw, **({"analysis": analysis} if analysis else {})})


def trial_row(trial_id: str, config: dict, curve: pd.DataFrame, status: str = "completed") -> dict:
    """A trials.csv row: the searched values and the curve's last metrics."""
    last = curve.iloc[-1].to_dict()
    row = {"trial_id": trial_id, "status": status}
    row.update({"config/" + k.replace(".", "/"): v for k, v in config.items()})
    row.update({k: v for k, v in last.items() if k != "trial_id"})
    return row


def curve_frame(trial_id, tokens, losses, *, model="micro-32", total=None, diverged=False):
    """history.csv rows of one trial: loss at each evaluation, flops from the model's shape."""
    tokens = np.asarray(tokens, dtype=float)
    losses = np.asarray(losses, dtype=float)
    fpt = flops_per_token(get_config(model, vocab_size=VOCAB), SEQ_LEN)
    total = total or tokens[-1]
    return pd.DataFrame(
        {
            "step": np.arange(1, len(tokens) + 1) * 10,
            "tokens": tokens,
            "flops": fpt * tokens,
            "train_loss": losses,
            "val_loss": losses,
            "val_bpb": losses / math.log(2) / 3.0,  # ~3 bytes/token
            "lr": 0.01,
            "tokens_per_s": 1e4,
            "elapsed_s": tokens / 1e4,
            "progress": tokens / total,
            "diverged": diverged,
            "completed": True,
            "trial_id": trial_id,
        }
    )


def tables(runs: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) from [(trial_id, config, curve, status)]."""
    trials = pd.DataFrame([trial_row(t, c, h, s) for t, c, h, s in runs])
    return trials, pd.concat([h for _, _, h, _ in runs], ignore_index=True)


def lr_study(noise: float = 0.002, seeds: int = 2, n_boot: int = 50):
    """μP: lr* = 0.01 at every width; SP: lr* = 0.01·64/width. SP diverges at 0.1 on wide models."""
    space = {
        "model.preset": {"grid": [f"micro-{w}" for w in WIDTHS]},
        "model.parametrization": {"grid": ["mup", "sp"]},
        "train.lr": {"grid": [float(x) for x in LR_GRID]},
    }
    analysis = {
        "kind": "lr_transfer",
        "width_key": "model.preset",
        "lr_key": "train.lr",
        "group_key": "model.parametrization",
        "n_boot": n_boot,
    }
    rng = np.random.default_rng(0)
    runs = []
    for width in WIDTHS:
        for group in ("mup", "sp"):
            lr_opt = 0.01 if group == "mup" else 0.01 * 64 / width
            for lr in LR_GRID:
                for seed in range(seeds):
                    loss = 0.3 * math.log(lr / lr_opt) ** 2 + 4.0 - 0.2 * math.log2(width / 32)
                    loss += noise * rng.standard_normal()
                    diverged = group == "sp" and lr == LR_GRID[-1] and width >= 128
                    tid = f"w{width}_{group}_{lr:.4g}_s{seed}"
                    tokens = np.linspace(1e4, 1e5, 5)
                    losses = loss + 0.5 * (1e5 / tokens - 1)
                    if diverged:
                        losses[-1] = math.log(VOCAB)  # what the trainer reports on divergence
                    config = {
                        "model.preset": f"micro-{width}",
                        "model.parametrization": group,
                        "train.lr": float(lr),
                    }
                    curve = curve_frame(
                        tid, tokens, losses, model=f"micro-{width}", diverged=diverged
                    )
                    runs.append((tid, config, curve, "diverged" if diverged else "completed"))
    return spec_with(space, analysis), *tables(runs)


def bs_tokens_needed(loss, batch_tokens, k):
    """Tokens to reach `loss` at a batch: k·L^-10·exp(0.1·(ln B − ln bs*(L))²); minimal at bs*."""
    bs_opt = BS_A / loss**BS_B
    return k * loss**-10.0 * np.exp(0.1 * np.log(batch_tokens / bs_opt) ** 2)


def batch_study(target_loss: float = 3.3):
    sizes = {"micro-32": 5.9e11, "micro-64": 3.0e11}  # the wider model needs half the tokens
    batches = (4, 8, 16, 32, 64, 128)  # x 32 tokens = 128 .. 4096 tokens per step
    space = {"model.preset": {"grid": list(sizes)}, "train.batch_size": {"grid": list(batches)}}
    analysis = {
        "kind": "batch_size",
        "target_loss": target_loss,
        "n_boot": 50,
        "paper_reference": True,
    }
    budget = 5e6  # tokens per run: the best batch ends near loss 3.2 (micro-32), 3.0 (micro-64)
    runs = []
    for preset, k in sizes.items():
        for b in batches:
            losses = np.linspace(7.0, 2.5, 500)
            tokens = bs_tokens_needed(losses, b * SEQ_LEN, k)
            keep = tokens <= budget
            tid = f"{preset}_b{b}"
            curve = curve_frame(tid, tokens[keep], losses[keep], model=preset, total=budget)
            runs.append((tid, {"model.preset": preset, "train.batch_size": b}, curve, "completed"))
    return spec_with(space, analysis), *tables(runs)


def nd_loss(n, d):
    return 20 * n**-ALPHA + 30 * d**-BETA + 1.7


def scaling_study(**options):
    presets = [f"micro-{w}" for w in WIDTHS]
    budgets = [1e5, 2e5, 4e5, 8e5]
    space = {"model.preset": {"grid": presets}, "train.tokens": {"grid": budgets}}
    analysis = {"kind": "scaling", "metric": "val_loss", "n_boot": 20, **options}
    runs = []
    for preset in presets:
        n = non_embedding_params(get_config(preset, vocab_size=VOCAB))
        for budget in budgets:
            tokens = np.linspace(budget / 10, budget, 10)
            tid = f"{preset}_{budget:.0e}"
            curve = curve_frame(tid, tokens, nd_loss(n, tokens), model=preset, total=budget)
            runs.append((tid, {"model.preset": preset, "train.tokens": budget}, curve, "completed"))
    return spec_with(space, analysis), *tables(runs)


def mup_study(n_trials: int = 80):
    """Random search: loss depends on lr strongly, init_std, scale_emb mildly, scale_depth not."""
    space = {
        "model.scale_emb": {"loguniform": [1.0, 30.0]},
        "model.scale_depth": {"uniform": [0.5, 3.0]},
        "model.init_std": {"loguniform": [0.01, 0.5]},
        "train.lr": {"loguniform": [1e-3, 1e-1]},
    }
    rng = np.random.default_rng(1)
    runs = []
    for i in range(n_trials):
        cfg = {
            "model.scale_emb": float(np.exp(rng.uniform(0, math.log(30)))),
            "model.scale_depth": float(rng.uniform(0.5, 3.0)),
            "model.init_std": float(np.exp(rng.uniform(math.log(0.01), math.log(0.5)))),
            "train.lr": float(np.exp(rng.uniform(math.log(1e-3), math.log(1e-1)))),
        }
        loss = (
            3.0
            + 0.4 * math.log(cfg["train.lr"] / 0.01) ** 2
            + 0.15 * math.log(cfg["model.init_std"] / 0.1) ** 2
            + 0.05 * math.log(cfg["model.scale_emb"] / 12) ** 2
        )
        diverged = cfg["train.lr"] > 0.06
        tid = f"t{i:03d}"
        curve = curve_frame(
            tid, [5e4, 1e5], [loss + 0.3, math.log(VOCAB) if diverged else loss], diverged=diverged
        )
        runs.append((tid, cfg, curve, "diverged" if diverged else "completed"))
    return spec_with(space, {"kind": "mup_hparams"}, algorithm="random"), *tables(runs)


def roundtrip(trials: pd.DataFrame, history: pd.DataFrame):
    """Through CSV and back, as the report reads them."""
    return (
        pd.read_csv(pd.io.common.StringIO(trials.to_csv(index=False))),
        pd.read_csv(pd.io.common.StringIO(history.to_csv(index=False))),
    )


# --- lr_transfer ------------------------------------------------------------------------------


def test_lr_transfer_recovers_optima_and_contrasts_mup_with_sp():
    spec, trials, history = lr_study()
    result = analyze(spec, *roundtrip(trials, history))
    laws = result.summary["laws"]
    for width in WIDTHS:
        mup = laws["lr_optimum"]["mup"][str(width)]
        sp = laws["lr_optimum"]["sp"][str(width)]
        assert mup["lr_opt"] == pytest.approx(0.01, rel=0.05)  # noise 0.002 on curvature 0.3
        assert sp["lr_opt"] == pytest.approx(0.01 * 64 / width, rel=0.05)
        assert mup["estimate"] == "interior" and not mup["at_edge"]
        assert mup["provenance"]["width"] == width and len(mup["provenance"]["trial_ids"]) == 18
        boot = mup["bootstrap"]
        assert boot["low"]["lr_opt"] <= mup["lr_opt"] <= boot["high"]["lr_opt"]
    assert abs(laws["lr_drift"]["mup"]["slope"]) < 0.03
    assert laws["lr_drift"]["mup"]["ratio"] < 1.1
    assert laws["lr_drift"]["sp"]["slope"] == pytest.approx(-1.0, abs=0.05)
    assert laws["lr_drift"]["sp"]["ratio"] == pytest.approx(8.0, rel=0.15)
    # SP diverged at lr 0.1 on the two widest models: counted, not fitted.
    assert laws["lr_optimum"]["sp"]["256"]["n_diverged"] == 2
    chosen = result.summary["chosen"]
    assert chosen["group"] == "mup" and chosen["lr"] == pytest.approx(0.01, rel=0.05)
    assert chosen["widths_used"] == [256]
    assert set(result.figures) == {"loss_vs_lr", "lr_opt_vs_width"}
    assert len(result.tables["lr_optima"]) == 2 * len(WIDTHS)
    json.dumps(result.summary, allow_nan=False)  # strict JSON: no NaN slips through


def test_lr_transfer_geomean_rule_and_edge_optimum_is_a_bound():
    spec, trials, history = lr_study(noise=0.0, seeds=1, n_boot=0)
    # Keep only lrs <= 0.01/1.78 for width 32 under μP: its optimum falls off the grid's top.
    cut = (trials["config/model/preset"] == "micro-32") & (trials["config/train/lr"] > 0.006)
    trials = trials[~cut]
    spec = dataclasses.replace(spec, analysis={**spec.analysis, "base_lr": "geomean", "n_boot": 0})
    result = analyze(spec, trials, history)
    edge = result.summary["laws"]["lr_optimum"]["mup"]["32"]
    assert edge["estimate"] == "lower_bound" and edge["bootstrap"] is None
    chosen = result.summary["chosen"]
    assert chosen["widths_used"] == [64, 128, 256]  # the bound is left out
    assert chosen["lr"] == pytest.approx(0.01, rel=1e-6)


# --- batch_size -------------------------------------------------------------------------------


def test_batch_size_recovers_the_law_from_curves():
    spec, trials, history = batch_study(target_loss=3.3)
    result = analyze(spec, *roundtrip(trials, history))
    law = result.summary["laws"]["batch_size_law"]
    assert law["b"] == pytest.approx(BS_B, rel=0.03)
    assert math.log(law["a"]) == pytest.approx(math.log(BS_A), abs=0.05 * math.log(BS_A))
    assert law["n_points"] >= 6 and len(law["provenance"]["points"]) == law["n_points"]
    chosen = result.summary["chosen"]
    assert chosen["batch_tokens_at_target"] == pytest.approx(BS_A / 3.3**BS_B, rel=0.05)
    low, high = chosen["batch_tokens_interval"]
    assert low <= chosen["batch_tokens_at_target"] <= high
    table = result.tables["batch_optima"]
    refined = table[table["refined"]]  # the rest are grid points, off by up to a grid step
    assert len(refined) >= 6
    expected = BS_A / refined["target_loss"] ** BS_B
    assert np.allclose(refined["batch_tokens_opt"], expected, rtol=0.02)
    assert table["in_fit"].equals(table["refined"])  # fit_points: refined (the default)
    assert set(result.figures) == {"loss_vs_tokens", "tokens_to_target", "bs_law"}
    assert any("reference only" in n for n in result.summary["notes"])


def test_auto_targets_lie_between_the_worst_common_loss_and_the_best_final():
    by_bs = {
        128.0: (np.array([1.0, 2.0, 3.0]), np.array([5.0, 4.5, 4.2])),
        256.0: (np.array([1.0, 2.0, 3.0]), np.array([5.5, 4.4, 3.9])),
    }
    targets = auto_targets(by_bs, 3)
    assert targets[0] == pytest.approx(4.2)  # every run reaches 4.2
    assert targets.min() > 3.9  # the best final loss itself is left out
    assert len(targets) == 3 and np.all(np.diff(targets) < 0)


# --- scaling ----------------------------------------------------------------------------------


def test_scaling_prefers_the_power_law_and_recovers_loss_nd():
    spec, trials, history = scaling_study(
        target_preset="micro-512", target_tokens=2e6, compute=1e15
    )
    result = analyze(spec, *roundtrip(trials, history))
    laws = result.summary["laws"]
    assert laws["preferred"] == "power_law"
    assert laws["power_law"]["rss"] < laws["exponential_law"]["rss"] / 5
    assert len(laws["power_law"]["residuals"]) == len(laws["envelope"]["loss"])
    assert len(laws["exponential_law"]["residuals"]) == len(laws["envelope"]["loss"])
    nd = laws["loss_nd"]
    assert nd["provenance"]["points"] == "final" and nd["n_points"] == 16
    assert nd["alpha"] == pytest.approx(ALPHA, rel=1e-3)
    assert nd["beta"] == pytest.approx(BETA, rel=1e-3)
    assert nd["l0"] == pytest.approx(1.7, abs=1e-3)
    optimal = result.summary["chosen"]["compute_optimal"]
    assert optimal["compute"] == 1e15
    assert optimal["n_opt"] * optimal["d_opt"] == pytest.approx(1e15 / 6, rel=1e-9)
    target = result.summary["chosen"]["target"]
    n512 = non_embedding_params(get_config("micro-512"))
    assert target["loss_nd"] == pytest.approx(nd_loss(n512, 2e6), rel=1e-3)
    assert set(result.figures) == {"loss_vs_compute", "loss_nd"}


def test_scaling_fits_loss_nd_on_decays_not_on_stable_runs_of_a_branching_study():
    """Stable runs end un-decayed, 0.3 above the law: their endpoints must not enter L(N, D)."""
    spec, trials, history = scaling_study()
    stable = trials["config/train/tokens"] == 8e5
    trials["branch/phase"] = np.where(stable, "stable", "decay")
    last = history.groupby("trial_id").tail(1).index
    bumped = history.index.isin(last) & history["trial_id"].isin(
        set(trials.loc[stable, "trial_id"])
    )
    history.loc[bumped, "val_loss"] += 0.3
    nd = analyze(spec, trials, history).summary["laws"]["loss_nd"]
    assert nd["n_points"] == 12 and nd["provenance"]["points"] == "final"
    assert nd["alpha"] == pytest.approx(ALPHA, rel=1e-3)


def test_scaling_power_law_fits_a_power_law_envelope_exactly():
    """History whose best loss at each compute is 2e3·C^-0.2 + 1.8: the fit returns it."""
    spec, trials, history = scaling_study()
    history = history.assign(val_loss=2e3 * history["flops"] ** -0.2 + 1.8)
    result = analyze(spec, trials, history)
    power = result.summary["laws"]["power_law"]
    assert power["alpha"] == pytest.approx(0.2, rel=1e-4)
    assert power["l0"] == pytest.approx(1.8, rel=1e-4)
    assert max(abs(r) for r in power["residuals"]) < 1e-6


# --- mup_hparams ------------------------------------------------------------------------------


def test_mup_hparams_ranks_sensitivity_and_finds_the_best_region():
    spec, trials, history = mup_study()
    result = analyze(spec, *roundtrip(trials, history))
    chosen = result.summary["chosen"]
    assert 0.005 < chosen["config"]["train.lr"] < 0.02
    sens = {k: v["sensitivity"] for k, v in result.summary["sensitivity"].items()}
    assert max(sens, key=sens.get) == "train.lr"
    assert min(sens, key=sens.get) == "model.scale_depth"
    lo, hi = result.summary["sensitivity"]["train.lr"]["top_band"]
    assert lo < 0.01 < hi and hi / lo < 10
    assert result.summary["counts"]["diverged"] > 0
    assert set(result.figures) == {"marginals", "convergence"}


# --- generic and validation -------------------------------------------------------------------


def test_generic_report_without_an_analysis_section():
    spec, trials, history = lr_study(seeds=1, n_boot=0)
    spec = dataclasses.replace(spec, analysis={})
    result = analyze(spec, trials, history)
    assert result.kind == "generic"
    best = result.tables["best_trials"]
    assert best["val_loss"].is_monotonic_increasing and len(best) == 10
    assert "train.lr" in best.columns
    assert set(result.figures) == {"curves", "loss_vs_searched"}


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        ({"kind": "nope"}, "analysis.kind: 'nope' is not an analysis kind; allowed: lr_transfer"),
        (
            {"kind": "lr_transfer", "width_key": "model.d_model"},
            "analysis.width_key: 'model.d_model'",
        ),
        ({"kind": "lr_transfer", "group_key": "train.seed"}, "analysis.group_key: 'train.seed'"),
        ({"kind": "lr_transfer", "widht_key": "x"}, "analysis.widht_key: unknown key"),
        ({"kind": "lr_transfer", "metric": "acc"}, "analysis.metric: 'acc' is not a metric"),
        ({"kind": "lr_transfer", "window": "two"}, "analysis.window: expected an integer"),
        ({"kind": "batch_size"}, "analysis.bs_key: 'train.batch_size' is not searched"),
        ({"kind": "mup_hparams", "keys": ["train.lr", "train.wd"]}, "analysis.keys[1]: 'train.wd'"),
        (
            {"kind": "scaling", "target_preset": "gpt-5", "target_tokens": 1e9},
            "analysis.target_preset: unknown model",
        ),
        ({"kind": "scaling", "target_preset": "micro-64"}, "analysis.target_tokens: give"),
        ("lr_transfer", "analysis: expected a mapping"),
    ],
)
def test_validate_names_the_key(analysis, message):
    spec, _, _ = lr_study(seeds=1)
    with pytest.raises(ConfigError) as err:
        validate(analysis, spec)
    assert str(err.value).startswith(message)


def test_validate_accepts_every_kind_with_its_defaults_where_the_keys_are_searched():
    spec, _, _ = lr_study(seeds=1)
    validate({}, spec)
    validate(spec.analysis, spec)
    validate({"kind": "scaling"}, spec)
    validate({"kind": "mup_hparams"}, spec)
    assert {"lr_transfer", "mup_hparams", "batch_size", "scaling"} <= set(KINDS)

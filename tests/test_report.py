"""write_report turns a synthetic study folder into report.md, PNGs, analysis.json and a W&B run.

The folders are written here as `sandbox run` leaves them (spec.yaml, fingerprint, trials.csv,
history.csv), from the synthetic studies of test_analysis.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from test_analysis import batch_study, lr_study, mup_study, scaling_study

from sandbox_service import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_study(root, spec, trials, history):
    folder = root / spec.name
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    (folder / "fingerprint").write_text("feedc0ffee123456\n")
    trials.to_csv(folder / "trials.csv", index=False)
    history.to_csv(folder / "history.csv", index=False)
    return folder


def check_pngs(folder, names):
    for name in names:
        data = (folder / "report" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_lr_transfer_report(tmp_path):
    spec, trials, history = lr_study(n_boot=20)
    folder = write_study(tmp_path, spec, trials, history)
    path = report.write_report(str(folder))
    assert path == folder / "report" / "report.md"
    text = path.read_text()
    for part in ("**Question.**", "## What was run", "## Headline", "## Method", "## Tables"):
        assert part in text
    assert (
        "![loss_vs_lr](loss_vs_lr.png)" in text
        and "![lr_opt_vs_width](lr_opt_vs_width.png)" in text
    )
    assert "| recommended_lr |" in text and "`train.lr`: grid" in text
    check_pngs(folder, ["loss_vs_lr", "lr_opt_vs_width"])
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["kind"] == "lr_transfer" and summary["fingerprint"] == "feedc0ffee123456"
    law = summary["laws"]["lr_optimum"]["mup"]["128"]
    assert law["law"] == "lr_optimum" and law["bootstrap"]["n_resamples"] == 20
    assert law["provenance"]["fingerprint"] == "feedc0ffee123456"
    assert set(summary["laws"]["lr_drift"]) == {"mup", "sp"}
    assert summary["chosen"]["lr"] == pytest.approx(0.01, rel=0.05)
    assert summary["figures"] == ["report/loss_vs_lr.png", "report/lr_opt_vs_width.png"]
    assert not (folder / "wandb").exists()


@pytest.mark.parametrize(
    ("build", "figures", "fields"),
    [
        (
            batch_study,
            ["loss_vs_tokens", "tokens_to_target", "bs_law"],
            ("batch_size_law", "batch_optima"),
        ),
        (
            scaling_study,
            ["loss_vs_compute", "loss_nd"],
            ("power_law", "exponential_law", "loss_nd", "compute_optimal"),
        ),
        (mup_study, ["marginals", "convergence"], ()),
    ],
)
def test_each_kind_writes_its_figures_and_laws(tmp_path, build, figures, fields):
    spec, trials, history = build()
    folder = write_study(tmp_path, spec, trials, history)
    report.write_report(str(folder))
    check_pngs(folder, figures)
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["kind"] == spec.analysis["kind"]
    assert set(fields) <= set(summary["laws"])
    for name in fields:
        entry = summary["laws"][name]
        assert "provenance" in (entry if isinstance(entry, dict) else entry[0])
    assert summary["headline"] and summary["notes"]


def test_generic_report_with_an_offline_wandb_run(tmp_path, monkeypatch):
    spec, trials, history = lr_study(seeds=1)
    spec = dataclasses.replace(spec, analysis={})
    folder = write_study(tmp_path, spec, trials, history)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    report.write_report(str(folder), wandb_mode="offline")
    check_pngs(folder, ["curves", "loss_vs_searched"])
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["kind"] == "generic" and summary["laws"] == {}
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))

"""`sandbox transfer`: studies' analysis.json -> a PretrainConfig YAML with its derivation."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from sandbox_service import yaml_safe
from sandbox_service.laws import BatchSizeLaw, predict_bs
from sandbox_service.transfer import (
    TransferError,
    TransferOptions,
    add_transfer_parser,
    dump_spec,
    load_study,
    round_batch,
    transfer,
)
from trainables.dictconfig import from_dict
from trainables.pretrain_config import PretrainConfig, ScalingConfig
from trainables.shapes import get_config, non_embedding_params

# analysis.json of the micro studies in docs/results.md (tinyshakespeare, 2026-11-28)
REAL_RUNS = Path(__file__).parent / "data" / "micro_studies"
REAL_STUDIES = ("lr-transfer-micro", "batch-size-micro", "scaling-micro", "wsd-micro")
N_24B = 2_442_057_984
PAPER_BS = {"a": 1.2110e9, "b": 6.2393}  # facts §3.3


def _analyses(lr=0.01, bs=PAPER_BS, metric="val_loss") -> dict[str, dict]:
    """Minimal analysis.json of each kind, in the schema `sandbox report` writes."""
    law = {"c_n": 2.0e2, "alpha": 0.29, "c_d": 5.0e2, "beta": 0.23, "l0": 1.6}
    return {
        "lr-s": {"kind": "lr_transfer", "fingerprint": "f-lr", "chosen": {"lr": lr}},
        "bs-s": {
            "kind": "batch_size",
            "fingerprint": "f-bs",
            "metric": metric,
            "chosen": dict(bs),
            "laws": {"batch_size_law": {**bs, "loss_range": [2.4, 3.5]}},
        },
        "sc-s": {
            "kind": "scaling",
            "fingerprint": "f-sc",
            "metric": metric,
            "laws": {"loss_nd": law},
            "chosen": {"compute_optimal": {"d_over_n": 192.0, "compute": 1e19}},
        },
        "wsd-s": {
            "kind": "wsd",
            "fingerprint": "f-wsd",
            "headline": {"reference fraction": 0.2},
            "decay_vs_cosine": [
                {"decay_fraction": 0.2, "decay_shape": "exp", "mean": -0.01},
                {"decay_fraction": 0.2, "decay_shape": "linear", "mean": -0.03},
                {"decay_fraction": 0.1, "decay_shape": "exp", "mean": -0.5},
            ],
        },
        "mup-s": {
            "kind": "mup_hparams",
            "fingerprint": "f-mup",
            "chosen": {
                "trial_id": "t1",
                "config": {
                    "model.scale_emb": 8.0,
                    "model.scale_depth": 1.2,
                    "model.init_std": 0.05,
                },
            },
        },
    }


def _write(root: Path, analyses: dict[str, dict]) -> None:
    for name, data in analyses.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "analysis.json").write_text(json.dumps(data))


def _run(root: Path, names, **opts):
    return transfer([load_study(str(root), n) for n in names], TransferOptions(**opts))


def test_batch_is_predict_bs_rounded_to_whole_micro_batches(tmp_path):
    _write(tmp_path, _analyses())
    spec, d = _run(tmp_path, ["lr-s", "bs-s"], target_loss=2.5, num_workers=8, tokens=1.1e12)
    law = BatchSizeLaw(**PAPER_BS, residuals=(), r2=1.0, n_points=3, loss_range=(2.4, 3.5))
    raw = predict_bs(law, 2.5)
    assert 3.9e6 < raw < 4.1e6  # facts §5: ≈ 3.98M tokens at L = 2.5
    unit = 4096 * 8
    assert spec.global_batch_tokens == round(raw / unit) * unit == 3_997_696
    assert spec.accumulation_steps() == 3_997_696 // unit
    assert spec.lr == 0.01 and spec.tokens == 1_100_000_000_000
    assert not d.warnings  # 2.5 lies inside the fitted [2.4, 3.5]


def test_round_batch_never_below_one_unit():
    assert round_batch(10.0, 4096) == 4096
    assert round_batch(3 * 4096 + 100, 4096) == 3 * 4096


def test_spec_round_trips_and_carries_every_source(tmp_path):
    _write(tmp_path, _analyses(lr=0.0123))
    spec, _ = _run(tmp_path, list(_analyses()), num_workers=4, micro_batch_size=2)
    out = tmp_path / "pretrain.yaml"
    out.write_text(dump_spec(spec))
    again = from_dict(PretrainConfig, yaml_safe.load(out))
    assert again == spec
    assert again.lr == 0.0123
    n = non_embedding_params(get_config("minicpm-2.4b"))
    assert again.tokens == round(192.0 * n)
    assert again.model == {
        "preset": "minicpm-2.4b",
        "scale_emb": 8.0,
        "scale_depth": 1.2,
        "init_std": 0.05,
    }
    assert (again.decay_fraction, again.decay_shape) == (0.2, "linear")  # best at 0.2, not 0.1
    for key in ("lr", "model", "tokens", "target_loss", "global_batch_tokens", "decay_fraction"):
        assert key in again.derivation
    assert "f-lr" in again.derivation["lr"] and "f-bs" in again.derivation["global_batch_tokens"]
    assert "extrapolation" in again.derivation["global_batch_tokens"]


def test_target_loss_from_scaling_law(tmp_path):
    _write(tmp_path, _analyses())
    spec, _ = _run(tmp_path, ["lr-s", "bs-s", "sc-s"], tokens=1e12)
    loss = 2.0e2 * N_24B**-0.29 + 5.0e2 * 1e12**-0.23 + 1.6
    law = BatchSizeLaw(**PAPER_BS, residuals=(), r2=1.0, n_points=3, loss_range=(2.4, 3.5))
    assert spec.global_batch_tokens == round_batch(predict_bs(law, loss), 4096)
    assert f"{loss:.4g}" in spec.derivation["target_loss"]


def test_warns_when_target_loss_outside_fitted_range(tmp_path):
    _write(tmp_path, _analyses())
    _, d = _run(tmp_path, ["lr-s", "bs-s"], target_loss=2.0, tokens=1e12)
    assert any("outside" in w and "[2.4, 3.5]" in w for w in d.warnings)


def test_missing_field_names_file_and_field(tmp_path):
    analyses = _analyses()
    del analyses["bs-s"]["chosen"]["b"]
    _write(tmp_path, analyses)
    with pytest.raises(TransferError) as e:
        _run(tmp_path, ["lr-s", "bs-s"], target_loss=2.5, tokens=1e12)
    assert str(tmp_path / "bs-s" / "analysis.json") in str(e.value)
    assert "`chosen.b`" in str(e.value)


def test_missing_study_and_missing_kind_refuse(tmp_path):
    _write(tmp_path, _analyses())
    with pytest.raises(TransferError, match="nope.*no such file"):
        load_study(str(tmp_path), "nope")
    with pytest.raises(TransferError, match="'batch_size' study is required"):
        _run(tmp_path, ["lr-s"], target_loss=2.5, tokens=1e12)


def test_no_target_loss_says_which_to_give(tmp_path):
    _write(tmp_path, _analyses())
    with pytest.raises(TransferError, match="give --target-loss \\(in val_loss"):
        _run(tmp_path, ["lr-s", "bs-s"], tokens=1e12)
    with pytest.raises(TransferError, match="give --tokens"):
        _run(tmp_path, ["lr-s", "bs-s"], target_loss=2.5)
    analyses = _analyses()
    analyses["sc-s"]["metric"] = "val_bpb"
    _write(tmp_path, analyses)
    with pytest.raises(TransferError, match="measures val_bpb.*give --target-loss in val_loss"):
        _run(tmp_path, ["lr-s", "bs-s", "sc-s"])


def test_command_writes_yaml_and_prints_derivation(tmp_path, capsys):
    _write(tmp_path, _analyses())
    out = tmp_path / "spec.yaml"
    p = argparse.ArgumentParser()
    add_transfer_parser(p.add_subparsers())
    argv = f"transfer --storage {tmp_path} --studies lr-s bs-s --tokens 1.1e12 --target-loss 2.5"
    argv += f" --num-workers 8 --gpu --strategy fsdp --data /x/a.txt --out {out}"
    args = p.parse_args(argv.split())
    assert args.fn(args) == 0
    text = capsys.readouterr().out
    assert "1. lr = 0.01" in text and "d/d_base = 2304/256 = 9" in text
    spec = from_dict(PretrainConfig, yaml_safe.load(out))
    assert spec.scaling == ScalingConfig(num_workers=8, use_gpu=True, strategy="fsdp")
    assert spec.data.sources == ("/x/a.txt",) and spec.data.vocab_size == 122_753


def test_real_studies(tmp_path):
    for name in REAL_STUDIES:
        (tmp_path / name).mkdir()
        shutil.copy(REAL_RUNS / name / "analysis.json", tmp_path / name / "analysis.json")
    real = {n: json.loads((tmp_path / n / "analysis.json").read_text()) for n in REAL_STUDIES}
    spec, d = _run(tmp_path, REAL_STUDIES, target_loss=3.0, num_workers=8)
    assert spec.lr == real["lr-transfer-micro"]["chosen"]["lr"]
    bs = real["batch-size-micro"]["chosen"]
    raw = bs["a"] / 3.0 ** bs["b"]
    assert spec.global_batch_tokens == round_batch(raw, 4096 * 8)
    ratio = real["scaling-micro"]["chosen"]["compute_optimal"]["d_over_n"]
    assert spec.tokens == round(ratio * N_24B)
    assert from_dict(PretrainConfig, yaml_safe.loads(dump_spec(spec))) == spec
    assert any("outside the bs law's fitted losses" in w for w in d.warnings)  # 3.0 < 3.68


def test_a_given_batch_needs_no_batch_size_study(tmp_path):
    _write(tmp_path, _analyses())
    spec, d = _run(tmp_path, ["lr-s"], tokens=1e9, global_batch_tokens=4096 * 96, num_workers=8)
    assert spec.global_batch_tokens == 4096 * 96
    assert d.steps["global_batch_tokens"] == "given, not derived from a law"
    assert "target_loss" not in d.steps  # no law is read, so no loss is needed
    with pytest.raises(TransferError, match="a 'batch_size' study is required"):
        _run(tmp_path, ["lr-s"], tokens=1e9)
    with pytest.raises(TransferError, match="multiple of seq_len 4096 × 8 workers"):
        _run(tmp_path, ["lr-s"], tokens=1e9, global_batch_tokens=4096 * 4, num_workers=8)

"""μP's coordinate check: activations stay flat in width under μP, drift under SP.

Widths 64..512 (8×) at depth 2, 4 AdamW steps at lr 1e-2 on one batch of 8×32 random tokens.
Slopes of log mean|x| vs log width at step 4, measured (torch 2.13, CPU):
    μP:                              blocks ≤ 0.02, logits 0.08
    SP:                              blocks 1.37,   logits 0.44
    μP without lr scaling:           blocks 0.55,   logits -0.36
    μP without 1/width_mult readout: blocks ≤ 0.10, logits 0.42
μP's criterion (arXiv 2203.03466 App. D) is that nothing blows up with width: hidden states flat,
|slope| < 0.15, and logits not growing, slope < 0.15. Logits may shrink: at init they are
O(1/sqrt(width)) under μP (slope -0.5) until the O(1) update term takes over after a few steps
(other batch shapes measured -0.16..0.08 at step 4).
"""

import pytest

import trainables.model as model_module
from trainables.coordcheck import coord_check, modules, plot, width_slopes

WIDTHS = [64, 128, 256, 512]
SEQ_LEN = 32  # half coord_check's default, to keep the four runs cheap
MUP_MAX_SLOPE = 0.15


def _slopes(result):
    return {m: width_slopes(result["records"], m) for m in modules(result["records"])}


def _is_width_stable(result):
    slopes = _slopes(result)
    hidden_flat = all(abs(s) < MUP_MAX_SLOPE for m, s in slopes.items() if m != "logits")
    return hidden_flat and slopes["logits"] < MUP_MAX_SLOPE


@pytest.fixture(scope="module")
def mup():
    return coord_check(WIDTHS, "mup", seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def sp():
    return coord_check(WIDTHS, "sp", seq_len=SEQ_LEN)


def test_mup_coordinates_are_flat_in_width(mup):
    slopes = _slopes(mup)
    assert set(slopes) == {"embedding", "layers.0", "layers.1", "logits"}
    assert _is_width_stable(mup), slopes
    assert abs(slopes["logits"]) < MUP_MAX_SLOPE, slopes


def test_sp_coordinates_drift_with_width(sp):
    slopes = _slopes(sp)
    assert not _is_width_stable(sp)
    assert slopes["layers.1"] > 0.5 and slopes["logits"] > 0.3, slopes


def test_mup_without_hidden_lr_scaling_fails(monkeypatch):
    monkeypatch.setattr(model_module, "hidden_lr_scale", lambda cfg: 1.0)
    result = coord_check(WIDTHS, "mup", seq_len=SEQ_LEN)
    assert not _is_width_stable(result), _slopes(result)


def test_mup_without_readout_multiplier_fails(monkeypatch):
    monkeypatch.setattr(model_module, "readout_multiplier", lambda cfg: 1.0)
    result = coord_check(WIDTHS, "mup", seq_len=SEQ_LEN)
    assert _slopes(result)["logits"] > MUP_MAX_SLOPE


def test_mup_equals_sp_at_base_width(mup, sp):
    at_base = lambda res: [r for r in res["records"] if r["width"] == 64]
    assert at_base(mup) == at_base(sp)
    assert at_base(mup) != [r for r in mup["records"] if r["width"] == 128]


def test_width_slopes_recovers_a_power_law():
    records = [
        {"width": w, "step": s, "module": "x", "l1": 3.0 * w**0.5 if s == 2 else 1.0}
        for w in (32, 64, 256)
        for s in (0, 1, 2)
    ]
    assert width_slopes(records, "x") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'y'"):
        width_slopes(records, "y")


def test_plot_writes_a_png(tmp_path, mup):
    path = tmp_path / "coord.png"
    plot([mup], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The model family table and rule: published parameter counts, the micro rule, validation."""

import dataclasses
import json
import re

import pytest

from trainables.shapes import (
    PRESETS,
    ModelConfig,
    describe,
    embedding_params,
    flops_per_token,
    get_config,
    micro,
    non_embedding_params,
)

# arXiv 2404.06395 Table 8, non-embedding parameters in millions as printed
TABLE_8 = {
    "0.009b": "9.43",
    "0.036b": "36.2",
    "0.066b": "66.0",
    "0.109b": "108.6",
    "0.166b": "166.2",
    "0.241b": "241.2",
    "0.499b": "498.6",
}
SHAPE = dict(
    d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=640, vocab_size=512, max_seq_len=64
)
MICRO_WIDTHS = [32, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512]


def test_released_models_match_to_the_parameter():
    assert non_embedding_params(PRESETS["minicpm-2.4b"]) == 2_442_057_984
    assert non_embedding_params(PRESETS["minicpm-1.2b"]) == 1_247_442_432


@pytest.mark.parametrize("name,published", TABLE_8.items())
def test_table8_matches_published_n(name, published):
    decimals = len(published.split(".")[1])
    assert f"{non_embedding_params(PRESETS[name]) / 1e6:.{decimals}f}" == published


@pytest.mark.parametrize("name", TABLE_8)
def test_table8_shape_rule(name):
    cfg = PRESETS[name]
    assert cfg.d_head == 64 and cfg.n_kv_heads == cfg.n_heads
    assert cfg.d_ff * 2 == cfg.d_model * 5
    assert cfg.dim_model_base == 256 and cfg.max_seq_len == 4096


def test_released_shapes():
    small, big = PRESETS["minicpm-1.2b"], PRESETS["minicpm-2.4b"]
    assert (small.n_heads // small.n_kv_heads, small.vocab_size) == (3, 73_440)
    assert big.width_mult == 9.0  # facts §1: matrices train at 0.01 / 9


def test_micro_rule_is_monotone_in_width():
    cfgs = [micro(w) for w in MICRO_WIDTHS]
    for a, b in zip(cfgs[:-1], cfgs[1:], strict=True):
        assert b.n_layers >= a.n_layers and b.n_heads >= a.n_heads
        assert non_embedding_params(b) > non_embedding_params(a)
    assert [c.n_layers for c in cfgs[:: len(cfgs) - 1]] == [2, 10]


@pytest.mark.parametrize("width", MICRO_WIDTHS)
def test_micro_shapes(width):
    cfg = micro(width)
    assert cfg.name == f"micro-{width}" and cfg.d_model == width
    assert cfg.d_ff * 2 == width * 5 and cfg.d_ff % 8 == 0
    assert cfg.n_heads * cfg.d_head == width and cfg.n_heads == cfg.n_kv_heads >= 2
    assert cfg.d_head == (16 if width == 32 else 32)


def test_micro_base_width_is_64():
    assert micro(64).width_mult == 1.0 and micro(256).width_mult == 4.0


@pytest.mark.parametrize("width", [16, 48, 100, 0, True, 64.0])
def test_micro_rejects_bad_widths(width):
    with pytest.raises(ValueError, match="width"):
        micro(width)


def test_get_config_resolves_presets_micro_and_overrides():
    assert get_config("micro-128") == micro(128)
    assert get_config("0.009b") == PRESETS["0.009b"]
    cfg = get_config("micro-128", parametrization="sp", n_layers=3, vocab_size=512)
    assert (cfg.parametrization, cfg.n_layers, cfg.vocab_size) == ("sp", 3, 512)
    assert get_config("minicpm-2.4b", max_seq_len=2048).max_seq_len == 2048


def test_get_config_errors_list_what_is_allowed():
    with pytest.raises(ValueError, match=r"minicpm-2\.4b.*micro-<width>"):
        get_config("llama-7b")
    with pytest.raises(ValueError, match="n_layer.*allowed.*n_layers"):
        get_config("micro-64", n_layer=3)
    with pytest.raises(ValueError, match="n_layers=0"):
        get_config("0.009b", n_layers=0)


def test_shape_fields_are_required():
    with pytest.raises(TypeError, match="d_model"):
        ModelConfig(**{k: v for k, v in SHAPE.items() if k != "d_model"})


@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0),
        ("n_layers", -1),
        ("vocab_size", 3.5),
        ("n_heads", True),
        ("n_heads", 3),  # does not divide d_model = 256
        ("n_kv_heads", 3),  # does not divide n_heads = 4
        ("parametrization", "ntk"),
        ("init_std", 0.0),
        ("scale_emb", float("nan")),
        ("norm_eps", float("inf")),
        ("width_scaled_embedding_init", 1),
        ("name", ""),
    ],
)
def test_validation_names_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        ModelConfig(**{**SHAPE, field: value})


def test_odd_head_dim_is_rejected_for_rope():
    with pytest.raises(ValueError, match="even"):
        ModelConfig(**{**SHAPE, "d_model": 60})


def test_flops_per_token_palm_formula():
    cfg = PRESETS["minicpm-2.4b"]
    n_total = non_embedding_params(cfg) + embedding_params(cfg)
    # MHA: n_heads·d_head = d, so the attention term is 12·L·d·T
    attn = 12 * cfg.n_layers * cfg.d_model * 4096
    assert flops_per_token(cfg) == 6 * n_total + attn
    assert flops_per_token(cfg, 2048) == 6 * n_total + attn / 2
    gqa = PRESETS["minicpm-1.2b"]  # attention FLOPs follow the 24 query heads, not the 8 kv
    n_gqa = non_embedding_params(gqa) + embedding_params(gqa)
    assert flops_per_token(gqa, 1) == 6 * n_gqa + 12 * 52 * 24 * 64
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)


def test_describe_is_json_and_complete():
    cfg = get_config("minicpm-1.2b")
    d = json.loads(json.dumps(describe(cfg)))
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= set(d)
    assert d["total_params"] == d["non_embedding_params"] + d["embedding_params"]
    assert d["embedding_params"] == 73_440 * 1536
    assert (d["d_head"], d["width_mult"], d["seq_len"]) == (64, 6.0, 4096)
    assert d["flops_per_token"] == flops_per_token(cfg)

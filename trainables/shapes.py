"""The MiniCPM model family: a table of named shapes plus one rule for CPU-sized models.

Every shape is a validated ``ModelConfig``; parameter counts and training FLOPs are closed forms
of the config (no torch needed), so a 2.4B shape can be sized on a laptop.

    python -m trainables.shapes                 # every preset and micro-32..micro-512
    python -m trainables.shapes micro-128 0.009b

Sources: MiniCPM (arXiv 2404.06395) Table 8 for the wind-tunnel shapes, the released Hugging Face
configs for MiniCPM-1.2B / 2.4B, PaLM (arXiv 2204.02311) App. B for FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass

PARAMETRIZATIONS = ("mup", "sp")
# field -> the largest value allowed: far beyond any real model (MiniCPM-2.4B: d 2304, L 40,
# V 122,753), so that a typo such as 1e9 for 1e3 fails here rather than when allocating.
_INT_FIELDS = {
    "d_model": 1 << 20,
    "n_layers": 1 << 12,
    "n_heads": 1 << 20,
    "n_kv_heads": 1 << 20,
    "d_ff": 1 << 22,
    "vocab_size": 1 << 24,
    "max_seq_len": 1 << 24,
    "dim_model_base": 1 << 20,
}
_FLOAT_FIELDS = ("scale_emb", "scale_depth", "init_std", "rope_theta", "norm_eps")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and μP constants of one MiniCPM decoder (facts §1); shape fields are required.

    ``dim_model_base`` is μP's base width d_base: hidden matrices init at
    ``init_std / sqrt(d / d_base)``, train at ``lr · d_base / d`` and the readout is divided by
    ``d / d_base``. At ``d_model == dim_model_base`` μP and SP are the same model.
    """

    name: str = "custom"
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
    dim_model_base: int = 256  # μP base width d_base (MiniCPM: 256)
    scale_emb: float = 12.0  # h0 = Embedding(ids) · scale_emb
    scale_depth: float = 1.4  # each residual branch is scaled by scale_depth / sqrt(L)
    init_std: float = 0.1  # std of every 2-D weight at d == d_base
    parametrization: str = "mup"  # "mup" | "sp" (standard parametrisation of the same model)
    # The paper is ambiguous about the embedding; OpenBMB's later engine keeps std = init_std.
    width_scaled_embedding_init: bool = False
    rope_theta: float = 1e4
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelConfig.name={self.name!r}: must be a non-empty string")
        for field, most in _INT_FIELDS.items():
            _check_positive_int(field, getattr(self, field), most)
        for field in _FLOAT_FIELDS:
            _check_positive_float(field, getattr(self, field))
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"ModelConfig.parametrization={self.parametrization!r}: allowed {PARAMETRIZATIONS}"
            )
        if not isinstance(self.width_scaled_embedding_init, bool):
            raise ValueError(
                "ModelConfig.width_scaled_embedding_init="
                f"{self.width_scaled_embedding_init!r}: must be True or False"
            )
        self._check_heads()

    def _check_heads(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads}: must divide d_model={self.d_model}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads}"
            )
        if self.d_head % 2:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads}: d_head = d_model // n_heads = "
                f"{self.d_head} must be even (RoPE rotates pairs of channels)"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def width_mult(self) -> float:
        """μP's width multiplier d / d_base (MiniCPM-2.4B: 2304 / 256 = 9)."""
        return self.d_model / self.dim_model_base


def _check_positive_int(field: str, value: object, most: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    if not ok or (most is not None and value > most):
        allowed = "a positive integer" if most is None else f"an integer in 1..{most:,}"
        raise ValueError(f"ModelConfig.{field}={value!r}: must be {allowed}")


def _check_positive_float(field: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value <= sys.float_info.max:  # also NaN, inf, ints beyond a float
        raise ValueError(f"ModelConfig.{field}={value!r}: must be a finite positive number")


# --- closed forms ---------------------------------------------------------------------------


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of facts §1: L·(d·n_q·d_h + 2·d·n_kv·d_h + n_q·d_h·d + 3·d·d_ff + 2·d) + d.

    Per layer: q, k, v, o projections, SwiGLU's gate/up/down, two RMSNorm gains; plus the
    final norm's d. Reproduces MiniCPM's published counts to the parameter.
    """
    d, dh, nq, nkv = cfg.d_model, cfg.d_head, cfg.n_heads, cfg.n_kv_heads
    attn = d * nq * dh + 2 * d * nkv * dh + nq * dh * d
    per_layer = attn + 3 * d * cfg.d_ff + 2 * d
    return cfg.n_layers * per_layer + d


def embedding_params(cfg: ModelConfig) -> int:
    """V·d: one matrix, shared by the input embedding and the output head (tied)."""
    return cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, 6·N' + 12·L·n_heads·d_head·T (PaLM, arXiv 2204.02311 App. B).

    N' = non_embedding_params + V·d. PaLM's 6N counts every matmul weight once (2 FLOPs per
    weight forward, 4 backward). With tied embeddings the input lookup is a gather (no FLOPs) but
    the output head is a real (d x V) matmul, so V·d enters N' exactly once. The norm gains are in
    N too; they are elementwise and negligible, kept so N' equals the parameter count. The
    attention term uses the query heads (GQA shares K/V but not the QK^T and AV products) and the
    full T as PaLM does (no halving for the causal mask), so numbers compare with the literature.
    T defaults to max_seq_len.
    """
    t = cfg.max_seq_len if seq_len is None else seq_len
    _check_positive_int("seq_len", t)
    n = non_embedding_params(cfg) + embedding_params(cfg)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.d_head * t


def describe(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Every field plus the derived values, JSON-able (what a run records beside its weights)."""
    t = cfg.max_seq_len if seq_len is None else seq_len
    n_body, n_emb = non_embedding_params(cfg), embedding_params(cfg)
    return {
        **dataclasses.asdict(cfg),
        "d_head": cfg.d_head,
        "width_mult": cfg.width_mult,
        "non_embedding_params": n_body,
        "embedding_params": n_emb,
        "total_params": n_body + n_emb,
        "seq_len": t,
        "flops_per_token": flops_per_token(cfg, t),
    }


# --- the table ------------------------------------------------------------------------------

# Wind-tunnel vocabulary: Table 8 lists no vocabulary; 122,753 (MiniCPM-2.4B's tokenizer) is a
# choice so that a wind-tunnel model and the 2.4B model share a tokenizer.
_WIND_TUNNEL_VOCAB = 122_753
_SEQ = 4096  # released configs (the first upload said 2048)


def _table8(name: str, d_model: int, n_layers: int) -> ModelConfig:
    """Table 8 of arXiv 2404.06395: d_ff = 2.5·d, d_head = 64, MHA."""
    n_heads = d_model // 64
    return ModelConfig(
        name=name,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=d_model * 5 // 2,
        vocab_size=_WIND_TUNNEL_VOCAB,
        max_seq_len=_SEQ,
    )


PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _table8("0.009b", 320, 8),  # N 9.43M
        _table8("0.036b", 512, 12),  # N 36.2M
        _table8("0.066b", 640, 14),  # N 66.0M
        _table8("0.109b", 768, 16),  # N 108.6M
        _table8("0.166b", 896, 18),  # N 166.2M
        _table8("0.241b", 1024, 20),  # N 241.2M
        _table8("0.499b", 1344, 24),  # N 498.6M
        ModelConfig(
            name="minicpm-1.2b",
            d_model=1536,
            n_layers=52,
            n_heads=24,
            n_kv_heads=8,  # GQA, 3 query heads per kv head
            d_ff=3840,
            vocab_size=73_440,
            max_seq_len=_SEQ,
        ),
        ModelConfig(
            name="minicpm-2.4b",
            d_model=2304,
            n_layers=40,
            n_heads=36,
            n_kv_heads=36,
            d_ff=5760,
            vocab_size=_WIND_TUNNEL_VOCAB,
            max_seq_len=_SEQ,
        ),
    )
}

# --- the rule -------------------------------------------------------------------------------

MICRO_PATTERN = "micro-<width>"
_MICRO_RE = re.compile(r"micro-(\d+)")
_MICRO_MIN_WIDTH = 32  # width steps of 32 keep d_head = 32 and d_ff = 2.5·width integral


def micro_n_heads(width: int) -> int:
    """Heads of 32 channels, at least 2 (micro-32 has 2 heads of 16)."""
    return max(2, width // 32)


def micro_n_layers(width: int) -> int:
    """Two more layers per doubling of width: 32 -> 2, 64 -> 4, 128 -> 6, 256 -> 8, 512 -> 10.

    Depth grows with width as in Table 8 (where L ≈ d/64 + 4), but logarithmically so that the
    widest CPU models stay trainable on 2 cores.
    """
    return 2 * (width.bit_length() - _MICRO_MIN_WIDTH.bit_length() + 1)


def micro(
    width: int,
    *,
    vocab_size: int = 4096,
    max_seq_len: int = 256,
    dim_model_base: int = 64,
    **overrides: object,
) -> ModelConfig:
    """The CPU family, one size dial: every shape is derived from ``width`` (d_model).

    width is a multiple of 32; n_heads = micro_n_heads(width) (MHA, d_head 32, 16 at width 32),
    d_ff = 2.5·width (Table 8's ratio), n_layers = micro_n_layers(width). The μP base width
    defaults to 64, so micro-64 is the base model on which μP and SP coincide.
    ``overrides`` replace any other field (validated again).
    """
    _check_micro_width(width)
    n_heads = micro_n_heads(width)
    cfg = ModelConfig(
        name=f"micro-{width}",
        d_model=width,
        n_layers=micro_n_layers(width),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=width * 5 // 2,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        dim_model_base=dim_model_base,
    )
    return _replace(cfg, overrides)


def _check_micro_width(width: object) -> None:
    ok = isinstance(width, int) and not isinstance(width, bool)
    if not ok or width < _MICRO_MIN_WIDTH or width % 32:
        raise ValueError(f"micro width={width!r}: must be a multiple of 32, at least 32")


def _replace(cfg: ModelConfig, overrides: dict[str, object]) -> ModelConfig:
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}: allowed {fields}")
    return dataclasses.replace(cfg, **overrides)


def get_config(name: str, **overrides: object) -> ModelConfig:
    """A preset by name, or ``micro-<width>``; ``overrides`` replace fields and are validated."""
    if name in PRESETS:
        return _replace(PRESETS[name], overrides)
    match = _MICRO_RE.fullmatch(name)
    if match:
        return micro(int(match.group(1)), **overrides)
    raise ValueError(f"unknown model {name!r}: allowed {sorted(PRESETS)} or {MICRO_PATTERN!r}")


def _main(names: list[str]) -> None:
    micro_names = [f"micro-{w}" for w in (32, 64, 128, 256, 512)]
    for name in names or [*PRESETS, *micro_names]:
        print(json.dumps(describe(get_config(name))))


if __name__ == "__main__":
    _main(sys.argv[1:])

"""Int4 weights in the GPTQ checkpoint layout: the config, the packed module and the sealed folder.

The layout is AutoGPTQ's / GPTQModel's "gptq" checkpoint format, the one transformers' GPTQ
integration reads. For each quantized linear with `in` inputs, `out` outputs, b bits and
`groups` groups of input columns (p = 32 / b values per int32):

    <name>.qweight  int32 (in/p, out)     p b-bit ints per int32 along the input dim, input r·p + k
                                          in bits b·k .. b·k + b − 1 (lowest bits first)
    <name>.qzeros   int32 (groups, out/p) (zero − 1) mod 2^b, packed the same way along out
    <name>.scales   fp16  (groups, out)
    <name>.g_idx    int32 (in,)           the group of each input column

    w'[o, i] = scales[g, o] · (q[o, i] − zero[g, o]),   g = g_idx[i]

The zero-point convention: the format stores zero − 1 in b bits and its readers add the 1 back,
some after masking to b bits and some before, so the nibble 2^b − 1 reads as 2^b in one and 0 in
another (the offset GPTQModel's "gptq_v2" format drops), and a zero of 0 has no safe encoding.
The quantizer therefore keeps zero in [1, 2^b − 1] (trainables.gptq.quant_params): every stored
nibble is in [0, 2^b − 2] and every reader decodes the same weights.

AutoGPTQ sizes the words as dim // 32 · b, so its kernels (and transformers through them) need
in and out divisible by 32: the released MiniCPM shapes and micro widths that are multiples of 64
are; other widths give the same layout at 32/b granularity, which `load_quantized` reads.

A folder (`save_quantized`) is a `trainables.checkpoint` folder of kind "minicpm-gptq":

    <dir>/model.safetensors    HF Llama names ("model.layers.0.self_attn.q_proj.qweight", ...);
                               embedding and norms stay full precision, the tied head is not stored
    <dir>/quantize_config.json bits, group_size, desc_act, sym, damp_percent, true_sequential,
                               static_groups, quant_method "gptq", checkpoint_format "gptq"
    <dir>/tokenizer.model, state.json (model_config, quant_config, lineage, metrics), manifest.json

    save_quantized("runs/x/gptq", qmodel, tok, QuantConfig(), lineage={...}, metrics={...})
    m = load_quantized("runs/x/gptq")                      # a LoadedModel with QuantLinear modules
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables import checkpoint as ckpt
from trainables.artifact import TOKENIZER_FILE, LoadedModel
from trainables.dictconfig import from_dict, to_dict
from trainables.model import MiniCPM
from trainables.shapes import ModelConfig
from trainables.tokenizer import Tokenizer

KIND = "minicpm-gptq"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
HF_PREFIX = "model"  # LlamaForCausalLM keeps the decoder under "model."
BITS = (2, 4, 8)  # widths that tile an int32 exactly, as the format packs them
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantConfig:
    """GPTQ settings; defaults are MiniCPM's released int4 models (facts §4)."""

    bits: int = 4
    group_size: int = 32  # consecutive input weights sharing a scale and zero; -1: whole rows
    desc_act: bool = False  # act-order: quantize columns by diag(H), largest first (DPO: True)
    sym: bool = False  # asymmetric min/max grid with a zero-point
    damp_percent: float = 0.01  # λ = damp_percent · mean(diag(H)) added to H's diagonal
    true_sequential: bool = True  # q/k/v, then o, then gate/up, then down, each on quantized inputs
    static_groups: bool = False  # with desc_act: group grids fixed from the original weights
    block_size: int = 128  # lazy-batch width B of the GPTQ paper (arXiv 2210.17323 §4, step 2)
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.bits not in BITS:
            raise ValueError(f"QuantConfig.bits={self.bits!r}: allowed {BITS} (int32 packing)")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"QuantConfig.group_size={self.group_size!r}: -1 or a positive int")
        for name in ("desc_act", "sym", "true_sequential", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name}={getattr(self, name)!r}: True or False")
        if not isinstance(self.damp_percent, (int, float)) or not 0 < self.damp_percent <= 1:
            raise ValueError(f"QuantConfig.damp_percent={self.damp_percent!r}: a number in (0, 1]")
        self._check_block_size()
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if not self.targets or unknown:
            raise ValueError(
                f"QuantConfig.targets={self.targets!r}: a non-empty subset of {PROJECTIONS}"
            )

    def _check_block_size(self) -> None:
        # a group never straddles two lazy blocks, so its grid sees every update made before it
        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"QuantConfig.block_size={self.block_size!r}: a positive int")
        if self.group_size > 0 and self.block_size % self.group_size:
            raise ValueError(
                f"QuantConfig.block_size={self.block_size}: must be a multiple of group_size="
                f"{self.group_size}; raise it to {math.lcm(self.block_size, self.group_size)}"
            )

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def quantize_config_json(self) -> dict[str, Any]:
        """quantize_config.json as AutoGPTQ / GPTQModel write it and transformers reads it."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One quantized (out, in) weight, unpacked."""

    ints: torch.Tensor  # (out, in) int32 in [0, 2^bits − 1]
    scales: torch.Tensor  # (groups, out) float16
    zeros: torch.Tensor  # (groups, out) int32 in [1, 2^bits − 1]
    g_idx: torch.Tensor  # (in,) int32
    bits: int

    def dequantize(self) -> torch.Tensor:
        """w' = scale · (q − zero) of each weight's group, float32 (out, in)."""
        g = self.g_idx.long()
        scale = self.scales.float()[g].T  # (out, in)
        zero = self.zeros[g].T  # (out, in)
        return scale * (self.ints - zero).float()


# --- packing (pure) ----------------------------------------------------------------------------


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) ints in [0, 2^bits) -> (R·bits/32, C) int32; row r·p + k goes to bits·k (p = 32/bits).

    qweight packs the transposed (in, out) ints this way, qzeros the transposed (out, groups).
    """
    per_word = 32 // bits
    rows, cols = values.shape
    if rows % per_word:
        raise ValueError(f"{rows} rows do not pack into int32 words of {per_word} {bits}-bit ints")
    if values.min() < 0 or values.max() >= 2**bits:
        raise ValueError(f"values outside [0, {2**bits - 1}] do not fit {bits} bits")
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits  # (p,)
    grouped = values.to(torch.int64).view(rows // per_word, per_word, cols)  # (R/p, p, C)
    words = (grouped << shifts[:, None]).sum(dim=1)  # disjoint bits: the sum is a bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_rows: (W, C) int32 -> (W·32/bits, C) int32."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    values = (words[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)  # (W, p, C)
    return values.reshape(-1, words.shape[1])


# --- the module --------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A bias-free linear whose weight is stored packed; it dequantizes once and caches.

    Move it with .to(device) only: forward casts the weight to the input's dtype, and a float
    cast of the module would also round its float16 scales.
    """

    def __init__(self, in_features: int, out_features: int, n_groups: int, bits: int):
        super().__init__()
        per_word = 32 // bits
        if in_features % per_word or out_features % per_word:
            raise ValueError(
                f"a {bits}-bit QuantLinear needs in_features ({in_features}) and out_features "
                f"({out_features}) divisible by {per_word}"
            )
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer(
            "qweight", torch.zeros(in_features // per_word, out_features, dtype=torch.int32)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, out_features // per_word, dtype=torch.int32)
        )
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        # the dequantized weight, made on first use: memory traded for full-speed matmuls
        self.register_buffer("weight_cache", None, persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> QuantLinear:
        out_features, in_features = qw.ints.shape
        layer = cls(in_features, out_features, qw.scales.shape[0], qw.bits)
        layer.qweight.copy_(pack_rows(qw.ints.T, qw.bits))
        layer.qzeros.copy_(pack_rows((qw.zeros - 1).T, qw.bits).T)  # the format's zero − 1
        layer.scales.copy_(qw.scales)
        layer.g_idx.copy_(qw.g_idx)
        return layer

    def quantized(self) -> QuantizedWeight:
        ints = unpack_rows(self.qweight, self.bits).T  # (out, in)
        zeros = unpack_rows(self.qzeros.T, self.bits).T + 1  # (groups, out)
        return QuantizedWeight(ints, self.scales, zeros, self.g_idx, self.bits)

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight_cache is None or self.weight_cache.device != self.qweight.device:
            self.weight_cache = self.quantized().dequantize()
        return self.weight_cache

    def _load_from_state_dict(self, *args, **kwargs):
        self.weight_cache = None  # new packed tensors make the cached weight stale
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self) -> str:
        groups = self.scales.shape[0]
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={groups}"


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --- the folder --------------------------------------------------------------------------------


class _HFLayout(nn.Module):
    """Holds the decoder under "model." so the tensor names are LlamaForCausalLM's."""

    def __init__(self, model: MiniCPM):
        super().__init__()
        setattr(self, HF_PREFIX, model)


def save_quantized(
    directory: str | Path,
    qmodel: MiniCPM,
    tokenizer: Tokenizer,
    qcfg: QuantConfig,
    *,
    lineage: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Seal a model with QuantLinear projections as a "minicpm-gptq" folder; returns it."""
    names = sorted(quantized_linears(qmodel))
    if not names:
        raise ValueError("the model has no QuantLinear modules; quantize it first (quantize_model)")
    if tokenizer.vocab_size > qmodel.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's embedding "
            f"has {qmodel.cfg.vocab_size} rows"
        )
    state = {
        "kind": KIND,
        "stage": "gptq",
        "model_config": to_dict(qmodel.cfg),
        "quant_config": to_dict(qcfg),
        "quantized_modules": names,
        "lineage": lineage or {},
        "metrics": metrics or {},
        "tokenizer_sha256": tokenizer.sha256,
    }
    config_json = json.dumps(qcfg.quantize_config_json(), indent=2) + "\n"
    files = {TOKENIZER_FILE: tokenizer.model_bytes, QUANTIZE_CONFIG_FILE: config_json.encode()}
    return ckpt.save_checkpoint(directory, _HFLayout(qmodel), None, state, extra_files=files)


def read_quantized_state(directory: str | Path) -> dict[str, Any]:
    """The verified state.json of a quantized folder; CheckpointError names what is wrong."""
    folder = Path(directory)
    ckpt.verify_checkpoint(folder)
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    if state.get("kind") != KIND or not (folder / QUANTIZE_CONFIG_FILE).is_file():
        raise ckpt.CheckpointError(
            f"{folder}: not a quantized model folder (state.json kind {state.get('kind')!r}, "
            f"expected {KIND!r}, and a {QUANTIZE_CONFIG_FILE}); make one with save_quantized"
        )
    return state


def is_quantized(directory: str | Path) -> bool:
    """True when `directory` holds a complete, intact quantized model folder."""
    try:
        read_quantized_state(directory)
    except ckpt.CheckpointError:
        return False
    return True


def load_quantized(directory: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify and load a quantized folder: a MiniCPM with QuantLinear projections, in eval mode."""
    folder = Path(directory)
    state = read_quantized_state(folder)
    where = str(folder / ckpt.STATE_FILE)
    config = from_dict(ModelConfig, state["model_config"], f"{where}:model_config")
    qcfg = from_dict(QuantConfig, state["quant_config"], f"{where}:quant_config")
    model = MiniCPM(config)
    modules = dict(model.named_modules())
    for name in state["quantized_modules"]:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ckpt.CheckpointError(f"{where}: quantized module {name!r} is not a linear")
        groups = qcfg.n_groups(linear.in_features)
        replace_module(
            model, name, QuantLinear(linear.in_features, linear.out_features, groups, qcfg.bits)
        )
    ckpt.load_checkpoint(folder, _HFLayout(model), None)
    tokenizer = Tokenizer((folder / TOKENIZER_FILE).read_bytes(), str(folder / TOKENIZER_FILE))
    return LoadedModel(model.to(device).eval(), tokenizer, config, state, str(folder))

"""GPTQ int4 quantization (Frantar et al. 2022, arXiv 2210.17323) and its round-to-nearest baseline.

The math, for one linear W (out, in) whose inputs X (in, n) come from calibration data:

    H = 2·X·Xᵀ / n                                  the Hessian of ||WX − W'X||² (paper Eq. 1)
    quantize the columns of W in order; after each column q, spread its error over the columns
    not yet quantized through the upper Cholesky factor of H⁻¹ (Alg. 1), lazily in blocks of B.

Each group of `group_size` consecutive input weights shares an asymmetric min/max grid (facts §4):

    scale = (max − min) / (2^b − 1),  zero = round(−min / scale),
    q = clamp(round(w / scale) + zero, 0, 2^b − 1),  w' = scale · (q − zero)

`quantize_model` runs block by block: block i is calibrated on the outputs of the already
quantized blocks < i, and inside a block (true_sequential) q/k/v, then o, then gate/up, then
down, each on inputs from the projections quantized before it. Embeddings and norms stay full
precision. `run_gptq` is the stage: a model folder in, a sealed int4 folder out, with the held-out
perplexity of full precision, GPTQ and RTN and the KL of each quantized model to full precision.

    qmodel, report = quantize_model(model, calib_ids, QuantConfig(), method="gptq")
    metrics = run_gptq("runs/x/sft/model", "runs/x/gptq", cfg=QuantConfig(), calib=None,
                       n_calib=128, seq_len=256, seed=0)
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.artifact import TOKENIZER_FILE, load_model_dir
from trainables.corpus import EMBEDDED
from trainables.data import DataConfig, prepare
from trainables.model import MiniCPM
from trainables.quantized import (
    QuantConfig,
    QuantizedWeight,
    QuantLinear,
    is_quantized,
    read_quantized_state,
    replace_module,
    save_quantized,
)
from trainables.tokenizer import Tokenizer
from trainables.tokens import TokenStore, sample_batch, val_batches
from trainables.trainer import TrainConfig, evaluate

METHODS = ("gptq", "rtn")
CALIB_BATCH = 8  # calibration sequences per forward: bounds activation memory, not the result

# --- the grid (pure) ---------------------------------------------------------------------------


def quant_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of each row of w (rows, g): the min/max grid of facts §4.

    As the reference quantizer does, the range is widened to contain 0 (so zero is an integer of
    the grid) and an all-zero row gets [−1, 1]. The scale is rounded to float16, the dtype the
    checkpoint stores, so the weights saved and the weights evaluated are the same numbers; the
    zero-point is kept in [1, 2^b − 1], what every reader of the gptq format decodes alike
    (trainables.quantized). Returns scale (rows,) float32 and zero (rows,) float32.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    # 2^-24 is float16's smallest subnormal: a tinier range must not round the scale to 0
    scale = ((xmax - xmin) / maxq).clamp(min=2**-24).half().float()
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    return scale, torch.round(-xmin / scale).clamp(1, maxq)


def quantize_ints(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """q = clamp(round(w / scale) + zero, 0, 2^b − 1), as float; w, scale, zero broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def relative_error(w: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """||WX − W'X||² / ||WX||² from H = 2XXᵀ/n alone: tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)."""
    w, delta = w.double(), (w - w_q).double()
    h = h.double()
    return ((delta @ h * delta).sum() / (w @ h * w).sum()).item()


def _group_size(cfg: QuantConfig, in_features: int) -> int:
    return in_features if cfg.group_size == -1 else cfg.group_size


def _result(ints, scales, zeros, g_idx, bits) -> QuantizedWeight:
    return QuantizedWeight(
        ints.to(torch.int32), scales.half(), zeros.to(torch.int32), g_idx.to(torch.int32), bits
    )


def rtn_quantize(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest: every group on its own min/max grid, no error feedback."""
    w = w.float()
    out_features, in_features = w.shape
    g = _group_size(cfg, in_features)
    scales, zeros, ints = [], [], []
    for start in range(0, in_features, g):
        scale, zero = quant_params(w[:, start : start + g], cfg.bits, cfg.sym)
        ints.append(quantize_ints(w[:, start : start + g], scale[:, None], zero[:, None], cfg.bits))
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(in_features, device=w.device) // g
    return _result(torch.cat(ints, 1), torch.stack(scales), torch.stack(zeros), g_idx, cfg.bits)


# --- GPTQ (pure) -------------------------------------------------------------------------------


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp_percent · mean(diag H) (paper §4, step 3)."""
    h = h.clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp_percent * torch.mean(torch.diag(h))
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(
            f"H + λI is not positive definite at column {info.item() - 1}: raise "
            f"QuantConfig.damp_percent (now {damp_percent}) or give more calibration data"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _static_grids(w: torch.Tensor, cfg: QuantConfig, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """static_groups: each group's grid from the weights before any update, (groups, out)."""
    grids = [quant_params(w[:, s : s + g], cfg.bits, cfg.sym) for s in range(0, w.shape[1], g)]
    return torch.stack([s for s, _ in grids]), torch.stack([z for _, z in grids])


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """GPTQ (arXiv 2210.17323 Alg. 1) in the lazy-batch Cholesky form of the reference code.

    w (out, in), h (in, in) = 2XXᵀ/n. With desc_act, columns go in order of decreasing diag(H)
    and g_idx maps each original column to the group it was quantized in.
    """
    w, h = w.float().clone(), h.float().clone()
    out_features, in_features = w.shape
    g = _group_size(cfg, in_features)
    dead = torch.diag(h) == 0  # inputs never active in calibration: any value is exact
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Grids fixed up front: static_groups for every group, and the single group of a whole row
    # (group_size −1), as the reference does. Otherwise each grid is set when its group starts.
    fixed = cfg.static_groups or g == in_features
    n_groups = math.ceil(in_features / g)
    grids = _static_grids(w, cfg, g) if fixed else (w.new_zeros(n_groups, out_features),) * 2
    scales, zeros = grids[0].clone(), grids[1].clone()
    perm = torch.argsort(torch.diag(h), descending=True) if cfg.desc_act else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    # the group of each quantization position: consecutive positions, or by original column
    positions = torch.arange(in_features, device=w.device)
    group_of = (perm if perm is not None and fixed else positions) // g
    hinv = _inverse_cholesky(h, cfg.damp_percent)
    ints = _quantize_columns(w, hinv, scales, zeros, group_of, cfg, set_grids=not fixed)
    if perm is not None:
        inverse = torch.argsort(perm)
        ints, group_of = ints[:, inverse], group_of[inverse]
    return _result(ints, scales, zeros, group_of, cfg.bits)


def _quantize_columns(w, hinv, scales, zeros, group_of, cfg: QuantConfig, set_grids: bool):
    """Alg. 1's loop: quantize column by column, pushing each error onto the later columns.

    w (out, in) is updated in place; hinv is the upper Cholesky factor of H⁻¹; scales and zeros
    (groups, out) are filled when set_grids. Returns the ints (out, in) as float.
    """
    in_features = w.shape[1]
    g = _group_size(cfg, in_features)
    ints = torch.zeros_like(w)
    groups = group_of.tolist()  # Python ints: indexing with them needs no device sync
    for i1 in range(0, in_features, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_features)
        block = w[:, i1:i2].clone()
        err = torch.zeros_like(block)
        for i in range(i2 - i1):
            col, grp = i1 + i, groups[i1 + i]
            if set_grids and col % g == 0:
                # a group starts, inside this block (block_size is a multiple of group_size), so
                # its grid sees every update so far; the reference reads the stale lazy copy
                scales[grp], zeros[grp] = quant_params(block[:, i : i + g], cfg.bits, cfg.sym)
            q = quantize_ints(block[:, i], scales[grp], zeros[grp], cfg.bits)
            ints[:, col] = q
            err[:, i] = (block[:, i] - scales[grp] * (q - zeros[grp])) / hinv[col, col]
            block[:, i:] -= err[:, i : i + 1] @ hinv[col : col + 1, col:i2]  # Alg. 1, line 7
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # the lazy batch update (paper §4, step 2)
    return ints


# --- the model, block by block ------------------------------------------------------------------


class _Hessian:
    """Accumulates H = 2XXᵀ/n over the rows of every batch a forward hook sees."""

    def __init__(self):
        self.sum, self.n = 0.0, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (B·T, in)
        self.sum = self.sum + x.T @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return 2.0 * self.sum / self.n


def _stages(cfg: QuantConfig) -> list[list[str]]:
    """Names inside a Block, in the order they are calibrated and quantized."""
    order = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    stages = [[n for n in stage if n.rpartition(".")[2] in cfg.targets] for stage in order]
    stages = [s for s in stages if s]
    return stages if cfg.true_sequential else [[n for s in stages for n in s]]


@torch.no_grad()
def _run_block(block: nn.Module, h: torch.Tensor, cos, sin) -> torch.Tensor:
    return torch.cat([block(c, cos, sin) for c in h.split(CALIB_BATCH)])


@torch.no_grad()
def _hessians(block: nn.Module, names: list[str], h: torch.Tensor, cos, sin):
    """H of each named linear's input when the block runs on the calibration states h."""
    acc = {n: _Hessian() for n in names}
    hooks = [
        block.get_submodule(n).register_forward_hook(lambda m, inp, out, a=acc[n]: a.add(inp[0]))
        for n in names
    ]
    try:
        _run_block(block, h, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
    return {n: a.value() for n, a in acc.items()}


def quantize_model(
    model: MiniCPM, calib_ids: torch.Tensor, cfg: QuantConfig, method: str = "gptq"
) -> tuple[MiniCPM, dict[str, Any]]:
    """A quantized copy of `model` (targets become QuantLinear) and its report.

    calib_ids (n, T) token ids. The report holds, per quantized linear, the relative
    reconstruction error ||WX − W'X||² / ||WX||² on the calibration inputs that linear saw.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {METHODS}")
    if calib_ids.ndim != 2 or calib_ids.dtype.is_floating_point or not calib_ids.numel():
        raise ValueError(
            f"calib_ids: {tuple(calib_ids.shape)} {calib_ids.dtype}; expected token ids (n, T)"
        )
    if calib_ids.shape[1] > model.cfg.max_seq_len:
        raise ValueError(
            f"calib_ids: windows of {calib_ids.shape[1]} tokens exceed the model's "
            f"max_seq_len={model.cfg.max_seq_len}"
        )
    t0 = time.perf_counter()
    qmodel = copy.deepcopy(model).eval()
    T = calib_ids.shape[1]
    cos, sin = qmodel.rope_cos[:T], qmodel.rope_sin[:T]
    with torch.no_grad():
        ids = calib_ids.to(qmodel.embed_tokens.weight.device)
        h = qmodel.embed_tokens(ids) * qmodel.cfg.scale_emb  # as MiniCPM.forward begins
    errors: dict[str, float] = {}
    for i, block in enumerate(qmodel.layers):
        for stage in _stages(cfg):
            for name, hess in _hessians(block, stage, h, cos, sin).items():
                w = block.get_submodule(name).weight.detach()
                qw = gptq_quantize(w, hess, cfg) if method == "gptq" else rtn_quantize(w, cfg)
                replace_module(block, name, QuantLinear.from_quantized(qw).to(w.device))
                errors[f"layers.{i}.{name}"] = relative_error(w, qw.dequantize(), hess)
        h = _run_block(block, h, cos, sin)  # the next block calibrates on quantized outputs
    report = {
        "method": method,
        "layer_errors": errors,
        "calib_tokens": calib_ids.numel(),
        "seconds": time.perf_counter() - t0,
    }
    return qmodel, report


# --- the stage ---------------------------------------------------------------------------------


def _token_store(init: Path, calib: str | None, max_chars: int | None) -> TokenStore:
    """`calib` (default: the embedded corpus) tokenized with the model's own tokenizer."""
    tokenizer = init / TOKENIZER_FILE
    vocab = Tokenizer.from_file(str(tokenizer)).vocab_size
    data = DataConfig(
        sources=(calib or EMBEDDED,),
        tokenizer=str(tokenizer),
        vocab_size=vocab,
        max_chars=max_chars,
    )
    return prepare(data)


def _eval_config(seq_len: int, eval_tokens: int) -> TrainConfig:
    return TrainConfig(
        tokens=eval_tokens, batch_size=CALIB_BATCH, seq_len=seq_len, eval_tokens=eval_tokens
    )


@torch.no_grad()
def kl_to_reference(
    model: MiniCPM, reference: MiniCPM, store: TokenStore, cfg: TrainConfig, device: torch.device
) -> float:
    """Mean KL(p_reference ‖ p_model) per validation token, in nats.

    Unlike the perplexity change it has no first-order term: a perturbation of an undertrained
    model can lower the loss by chance, but never the KL, so it ranks small quantization errors.
    """
    total, count = 0.0, 0
    for x, _ in val_batches(store.val, cfg.batch_size, cfg.seq_len, cfg.eval_tokens):
        ref = F.log_softmax(reference(x.to(device)).float(), dim=-1)  # (B, T, V)
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1)
        total += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
        count += x.numel()
    return total / count


def _metrics(model, reference, store, cfg: TrainConfig, device) -> dict[str, float]:
    loss, bpb = evaluate(model, store, cfg, None, device)
    model.eval()  # evaluate leaves the model in train mode
    metrics = {"val_loss": loss, "ppl": math.exp(loss), "val_bpb": bpb}
    if reference is not None:
        metrics["kl_to_fp"] = kl_to_reference(model, reference, store, cfg, device)
    return metrics


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    errors = report["layer_errors"]
    return {
        "mean": sum(errors.values()) / len(errors),
        "max": max(errors.values()),
        "seconds": report["seconds"],
        "layers": errors,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def run_gptq(
    init: str,
    out: str,
    *,
    cfg: QuantConfig,
    calib: str | None,
    n_calib: int,
    seq_len: int,
    seed: int,
    eval_tokens: int = 32768,
    max_chars: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Quantize the model folder `init` with GPTQ (and RTN, for comparison) into `out`.

    Calibration: n_calib windows of seq_len tokens from the training split of `calib` (a path or
    URL; None: the embedded corpus; max_chars caps what is read), tokenized with the model's
    tokenizer. Perplexity and KL to full precision on at most eval_tokens of its validation split.
    An `out` that is already complete is not redone: its recorded metrics are returned.
    """
    init_dir, out_dir = Path(init), Path(out)
    if is_quantized(out_dir):
        metrics = read_quantized_state(out_dir)["metrics"]
        return {**metrics, "skipped": True, "bytes_on_disk": _folder_bytes(out_dir)}
    dev = torch.device(device)
    loaded = load_model_dir(init_dir, device=dev)
    if not 0 < seq_len <= loaded.config.max_seq_len or n_calib <= 0:
        raise ValueError(
            f"seq_len={seq_len} must be in 1..{loaded.config.max_seq_len} (the model's "
            f"max_seq_len) and n_calib={n_calib} positive"
        )
    store = _token_store(init_dir, calib, max_chars)
    calib_ids, _ = sample_batch(store.train, n_calib, seq_len, seed, step=0)
    ecfg = _eval_config(seq_len, eval_tokens)
    metrics: dict[str, Any] = {"fp": _metrics(loaded.model, None, store, ecfg, dev)}
    for method in METHODS:
        qmodel, report = quantize_model(loaded.model, calib_ids, cfg, method)
        metrics[method] = _metrics(qmodel, loaded.model, store, ecfg, dev)
        metrics[method]["layer_errors"] = _summary(report)
        if method == "gptq":
            gptq_model = qmodel
    lineage = {
        "init": str(init_dir),
        "calib": calib or EMBEDDED,
        "n_calib": n_calib,
        "seq_len": seq_len,
        "seed": seed,
    }
    gptq_model = gptq_model.cpu()
    save_quantized(out_dir, gptq_model, loaded.tokenizer, cfg, lineage=lineage, metrics=metrics)
    return {
        **metrics,
        "skipped": False,
        "bytes_on_disk": _folder_bytes(out_dir),
        "fp_bytes_on_disk": _folder_bytes(init_dir),
    }

"""`sandbox plan`: what a pretrain spec costs: parameters, memory per GPU, FLOPs, GPU-hours, days.

    sandbox plan pretrain.yaml [--mfu 0.4] [--gpu h100 | --peak-tflops 989] [--gpu-memory-gib 80]
    sandbox plan pretrain.yaml --json

Closed forms of the spec, no torch kernels and no GPU needed:
- parameters: `trainables.shapes` (MiniCPM-2.4B: 2,442,057,984 non-embedding, facts §1);
- model state: bytes per parameter by precision, the ZeRO accounting (Rajbhandari et al. 2020,
  arXiv 1910.02054 §3.1): mixed precision keeps bf16 weights (2) and grads (2), an fp32 master
  copy (4) and AdamW's two fp32 moments (8) = 16 bytes; the trainer here (torch autocast, fp32
  parameters) holds weights 4 + grads 4 + moments 8 = 16 bytes, plus autocast's bf16 weight
  copies (2) while a step runs. DDP replicates the state
  on every worker; FSDP (full shard, ZeRO-3) divides it by the number of workers;
- activations: `activation_bytes_per_layer`, Korthikanti et al. 2022 (arXiv 2205.05198 §4.1)
  adapted to this decoder with SDPA attention, no activation recomputation: what autograd
  keeps, not the allocator's peak;
- compute: flops_per_token (PaLM App. B) × tokens; GPU-hours = FLOPs / (MFU · peak) / 3600.
Peak dense bf16 tensor throughput, from NVIDIA's datasheets (the sparse figure halved): H100 SXM
989 TFLOP/s, H200 SXM 989 TFLOP/s, A100 SXM 312 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json

from sandbox_service import yaml_safe
from trainables.dictconfig import from_dict
from trainables.pretrain_config import PretrainConfig
from trainables.shapes import ModelConfig, embedding_params, flops_per_token, non_embedding_params
from trainables.trial import model_config

GIB = 1 << 30
# name -> (peak dense bf16 FLOP/s, memory GiB): datasheet capacities (H100 SXM 80 GB, H200 141 GB,
# A100 SXM 80 GB); the CUDA context and the allocator's slack take 1-2 GiB of them.
GPUS = {"h100": (989e12, 80), "h200": (989e12, 141), "a100": (312e12, 80)}
# bytes per parameter: (weights, grads, fp32 master copy, AdamW moments m and v)
PRECISION_BYTES = {"bf16-mixed": (2, 2, 4, 8), "fp32": (4, 4, 0, 8)}
BF16, FP32 = 2, 4
INDEX_BYTES = 8  # int64 token ids (the embedding's backward keeps them)


def spec_model(cfg: PretrainConfig) -> ModelConfig:
    """The model the trainer builds: the preset plus overrides, vocabulary from data.vocab_size."""
    return model_config({"vocab_size": cfg.data.vocab_size, **cfg.model})


def state_bytes(n_params: int, precision: str = "bf16-mixed") -> dict[str, int]:
    """Bytes of weights, grads, master weights and AdamW moments for `n_params` parameters."""
    weights, grads, master, moments = PRECISION_BYTES[precision]
    out = {"weights": weights, "grads": grads, "master": master, "adam": moments}
    out = {k: v * n_params for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def activation_bytes_per_layer(model: ModelConfig, seq_len: int, micro_batch: int) -> int:
    """Bytes one decoder layer saves for backward: s·b·(30·d + 4·d_kv + 8·d_ff + 4·n_heads + 8).

    Korthikanti et al. (arXiv 2205.05198 §4.1, eq. 1) count s·b·h·(34 + 5·a·s/h) bytes for a
    GPT layer in 16-bit. Adapted to trainables/model.py under bf16 autocast, per token:
    - two RMSNorms on the fp32 residual stream, each keeping its fp32 input, the fp32
      normalised value (for the gain's gradient) and rstd: 2·(4d + 4d + 4) = 16d + 8;
    - autocast casts the normed input to bf16 once per projection (q, k, v; gate, up): 5·2d;
    - SDPA (flash) keeps Q 2d, K and V 2·2·d_kv (d_kv = n_kv·d_head), the output 2d (which is
      also the o-projection input) and an fp32 logsumexp per head 4·n_heads; no s×s scores, so
      Korthikanti's 5·a·s/h term goes;
    - SwiGLU keeps gate, silu(gate), up and their product: 4·2·d_ff. No dropout anywhere.
    MHA with d_ff = 2.5·d: ≈ 54·s·b·d. tests/test_plan.py checks the formula to the byte
    against the tensors autograd saves (CPU); CUDA's fused RMSNorm may keep less.
    """
    d, d_kv = model.d_model, model.n_kv_heads * model.d_head
    norms = 2 * (2 * FP32 * d + FP32)
    casts = 5 * BF16 * d
    attention = BF16 * (2 * d + 2 * d_kv) + FP32 * model.n_heads
    swiglu = 4 * BF16 * model.d_ff
    return seq_len * micro_batch * (norms + casts + attention + swiglu)


def head_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int) -> int:
    """The final RMSNorm (8d + 4 as above), the head input's gradient 4d that the chunked loss
    forms in forward (trainables.model.linear_cross_entropy) and the int64 token ids 8. The
    (tokens, V) logits are never saved: each chunk's live only while it is computed."""
    per_token = 2 * FP32 * model.d_model + FP32 + FP32 * model.d_model
    return seq_len * micro_batch * (per_token + INDEX_BYTES)


def loss_buffer_bytes(model: ModelConfig) -> int:
    """The fp32 (V, d) head gradient the chunked loss holds from forward to backward."""
    return FP32 * model.vocab_size * model.d_model


def activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int) -> int:
    layers = model.n_layers * activation_bytes_per_layer(model, seq_len, micro_batch)
    head = head_activation_bytes(model, seq_len, micro_batch)
    return layers + head + loss_buffer_bytes(model)


def gpu_hours(total_flops: float, mfu: float, peak_flops: float) -> float:
    """GPU-hours = FLOPs / (MFU · peak FLOP/s) / 3600 s."""
    return total_flops / (mfu * peak_flops) / 3600.0


def plan(cfg: PretrainConfig, mfu: float, peak_flops: float, gpu_memory: float) -> dict:
    """Everything `sandbox plan` prints, JSON-able; `gpu_memory` in bytes per worker."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: must be in (0, 1]")
    if not peak_flops > 0 or not gpu_memory > 0:
        raise ValueError(f"peak_flops={peak_flops}, gpu_memory={gpu_memory}: must be > 0")
    model = spec_model(cfg)
    n_body, n_emb = non_embedding_params(model), embedding_params(model)
    workers = cfg.scaling.num_workers
    states = {p: state_bytes(n_body + n_emb, p) for p in PRECISION_BYTES}
    act = activation_bytes(model, cfg.seq_len, cfg.micro_batch_size)
    per_worker = {
        "ddp": states["bf16-mixed"]["total"] + act,
        "fsdp": states["bf16-mixed"]["total"] / workers + act,
    }
    fits = {k: v <= gpu_memory for k, v in per_worker.items()}
    fpt = flops_per_token(model, cfg.seq_len)
    total_flops = fpt * cfg.tokens
    hours = gpu_hours(total_flops, mfu, peak_flops)
    return {
        "name": cfg.name,
        "model": model.name,
        "params": {"non_embedding": n_body, "embedding": n_emb, "total": n_body + n_emb},
        "state_bytes": states,
        "activation_bytes": {
            "per_layer": activation_bytes_per_layer(model, cfg.seq_len, cfg.micro_batch_size),
            "head": head_activation_bytes(model, cfg.seq_len, cfg.micro_batch_size),
            "loss_buffer": loss_buffer_bytes(model),
            "total": act,
            "micro_batch_size": cfg.micro_batch_size,
        },
        "per_worker_bytes": per_worker,
        "strategy": cfg.scaling.strategy,
        "fits": fits,
        "advice": advice(cfg.scaling.strategy, fits),
        "num_workers": workers,
        "accumulation_steps": cfg.accumulation_steps(),
        "tokens_per_step": cfg.global_batch_tokens,
        "batch_schedule": batch_schedule(cfg),
        "steps": cfg.total_steps,
        "decay_start": cfg.decay_start,
        "tokens": cfg.tokens,
        "flops_per_token": fpt,
        "total_flops": total_flops,
        "mfu": mfu,
        "peak_flops": peak_flops,
        "gpu_memory_bytes": gpu_memory,
        "gpu_hours": hours,
        "wall_clock_days": hours / workers / 24.0,
    }


def batch_schedule(cfg: PretrainConfig) -> list[dict]:
    """Each batch segment: from which step and token count, its batch and micro-batches."""
    return [
        {
            "from_step": seg.start_step,
            "from_tokens": seg.start_tokens,
            "tokens_per_step": seg.global_batch_tokens,
            "accumulation_steps": cfg.accumulation_steps(step=seg.start_step),
        }
        for seg in cfg.segments
    ]


def advice(strategy: str, fits: dict[str, bool]) -> str:
    if fits[strategy]:
        return f"{strategy} fits"
    if strategy == "ddp" and fits["fsdp"]:
        return "ddp does not fit: set scaling.strategy: fsdp (shards the model state)"
    return f"{strategy} does not fit: lower micro_batch_size or add workers"


# --- printing ----------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def format_plan(p: dict) -> str:
    """The plan as lines a human reads top to bottom, each derived from the ones above."""
    par, act, worker = p["params"], p["activation_bytes"], p["per_worker_bytes"]
    lines = [
        f"plan for {p['name']} (model {p['model']})",
        f"parameters: non-embedding {par['non_embedding']:,} + embedding {par['embedding']:,} "
        f"(tied) = {par['total']:,}",
    ]
    for precision, s in p["state_bytes"].items():
        lines.append(
            f"state {precision:10s}: weights {_gib(s['weights'])} + grads {_gib(s['grads'])} + "
            f"master {_gib(s['master'])} + AdamW m,v {_gib(s['adam'])} = {_gib(s['total'])} "
            f"({s['total'] // par['total']} bytes/param)"
        )
    lines += [
        f"activations per micro-batch of {act['micro_batch_size']}: {_gib(act['per_layer'])} "
        f"per layer (s·b·(30d + 4d_kv + 8d_ff + 4h + 8) bytes) + head {_gib(act['head'])} + "
        f"loss buffer {_gib(act['loss_buffer'])} = "
        f"{_gib(act['total'])}",
        f"per worker ({p['num_workers']} workers, bf16-mixed): ddp {_gib(worker['ddp'])} "
        f"(state + activations), fsdp {_gib(worker['fsdp'])} (state / {p['num_workers']} + "
        f"activations), of {_gib(p['gpu_memory_bytes'])}",
        f"strategy {p['strategy']}: {p['advice']}",
        f"tokens per step {p['tokens_per_step']:,} ({p['accumulation_steps']} micro-batches per "
        f"worker); steps {p['steps']:,}, decay from step {p['decay_start']:,}; tokens "
        f"{p['tokens']:,}",
        *(
            f"  from step {b['from_step']:,} ({b['from_tokens']:,} tokens): "
            f"{b['tokens_per_step']:,} tokens per step ({b['accumulation_steps']} micro-batches)"
            for b in p["batch_schedule"][1:]
        ),
        f"FLOPs: {p['flops_per_token']:.4g} per token × {p['tokens']:.4g} tokens = "
        f"{p['total_flops']:.4g}",
        f"GPU-hours: {p['total_flops']:.4g} / ({p['mfu']:g} MFU × {p['peak_flops'] / 1e12:g} "
        f"TFLOP/s) / 3600 = {p['gpu_hours']:,.0f}",
        f"wall clock: {p['gpu_hours']:,.0f} / {p['num_workers']} GPUs / 24 = "
        f"{p['wall_clock_days']:,.1f} days",
    ]
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------


def add_plan_parser(subparsers) -> None:
    """Add `plan` to the `sandbox` command's subparsers."""
    p = subparsers.add_parser(
        "plan",
        help="parameters, memory, FLOPs and GPU-hours of a pretrain spec",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help="a PretrainConfig YAML (from `sandbox transfer`)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (0.4)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s (overrides --gpu)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory per worker (default: --gpu's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = from_dict(PretrainConfig, yaml_safe.load(args.spec), args.spec)
    peak, memory_gib = GPUS[args.gpu]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak
    memory_gib = args.gpu_memory_gib or memory_gib
    result = plan(cfg, args.mfu, peak, memory_gib * GIB)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0

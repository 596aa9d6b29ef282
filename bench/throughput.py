"""Trainer efficiency: tokens/s and model FLOP/s ÷ the measured matmul peak, beside a plain loop.

For each size and precision it times two things in the same process, on the same batches:
- the trainer: `trainables.trainer.train` itself (batch sampling, schedule, forward, loss,
  backward, clipping, μP AdamW, metrics), reading the `tokens_per_s` it reports per window;
- the reference: the same model written the obvious way (`bench/reference.py`: eager PyTorch,
  masked-softmax attention, full logits, default AdamW), with the trainer's initial weights.
Model FLOP/s = `flops_per_token` (PaLM App. B) × tokens/s; the peak is the best 2048³ matmul
of the same dtype measured in this process before and after (the larger is kept). Beside it,
the rate of the step's own matmuls at their own shapes (`matmul_gflops`: each linear map's
forward and two backward products at batch × seq rows, `benchlib.step_matmul_rate`), about
the ceiling of this step's FLOP/s on this machine, and what share of it the trainer reaches
(`of_matmul_rate`, model FLOPs incl. attention ÷ that rate). Each figure
is the best window after a warm-up one: on a shared machine other work only ever slows a
window down, so the fastest is the closest to what the code itself costs. Targets (CPU):
trainer ≥ 1.5× the reference's tokens/s, and ≥ 50% of the peak at the largest micro size.

    python bench/throughput.py                   # micro-32 ... micro-512 and 0.009b, fp32 and bf16
    python bench/throughput.py --sizes micro-64 --windows 2 --batch 4    # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import (
    add_out,
    describe,
    machine,
    matmul_peak,
    random_store,
    step_matmul_rate,
    table,
    write,
)
from reference import ReferenceMiniCPM, reference_optimizer, reference_step

from trainables.model import MiniCPM
from trainables.shapes import ModelConfig, flops_per_token, get_config, non_embedding_params
from trainables.tokens import TokenStore, sample_batch
from trainables.trainer import TrainConfig, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_config(size: str, seq: int, vocab: int) -> ModelConfig:
    """Micro sizes at the study vocabulary; wind-tunnel shapes keep their own (122,753)."""
    extra = {"vocab_size": vocab} if size.startswith("micro") else {}
    return get_config(size, max_seq_len=seq, **extra)


def trainer_rate(cfg: ModelConfig, store: TokenStore, precision: str, args) -> list[float]:
    """tokens/s of each reported window after the warm-up window."""
    windows = []
    train_cfg = TrainConfig(
        tokens=(args.window * (1 + args.windows)) * args.batch * args.seq,
        batch_size=args.batch,
        seq_len=args.seq,
        eval_every=args.window,
        eval_tokens=args.seq,  # one window: evaluation is excluded from the timing anyway
        checkpoint_every=0,
        precision=precision,
    )
    train(cfg, train_cfg, store, report=lambda m, _: windows.append(m["tokens_per_s"]))
    return windows[1:]


def reference_rate(cfg: ModelConfig, store: TokenStore, precision: str, args) -> list[float]:
    torch.manual_seed(0)
    model = ReferenceMiniCPM(cfg)
    model.load_state_dict(MiniCPM(cfg).state_dict())
    opt = reference_optimizer(model, 0.01)
    amp = None if precision == "fp32" else DTYPES[precision]
    rates = []
    for w in range(1 + args.windows):
        t0 = time.perf_counter()
        for i in range(args.window):
            x, y = sample_batch(store.train, args.batch, args.seq, 0, w * args.window + i)
            reference_step(model, opt, x, y, amp)
        rates.append(args.window * args.batch * args.seq / (time.perf_counter() - t0))
    return rates[1:]


def same_loss(cfg: ModelConfig, store: TokenStore, args) -> float:
    """|loss(trainer model) − loss(reference)| on one batch at the same weights (fp32)."""
    torch.manual_seed(0)
    model = MiniCPM(cfg)
    ref = ReferenceMiniCPM(cfg)
    ref.load_state_dict(model.state_dict())
    x, y = sample_batch(store.train, args.batch, args.seq, 0, 0)
    with torch.no_grad():
        return abs(model(x, y).item() - ref(x, y).item())


def measure(size: str, precision: str, peak: float, args) -> dict:
    cfg = model_config(size, args.seq, args.vocab)
    store = random_store(cfg.vocab_size)
    ref = max(reference_rate(cfg, store, precision, args))
    tps = max(trainer_rate(cfg, store, precision, args))
    fpt = flops_per_token(cfg, args.seq)
    rows, dtype = args.batch * args.seq, DTYPES[precision]
    matmul_rate = step_matmul_rate(MiniCPM(cfg), rows, dtype, seconds=args.matmul_seconds)
    return {
        "model": size,
        "params": non_embedding_params(cfg),
        "vocab": cfg.vocab_size,
        "precision": precision,
        "tokens_per_s": tps,
        "gflops": fpt * tps / 1e9,
        "of_peak": fpt * tps / peak,
        "matmul_gflops": matmul_rate / 1e9,
        "of_matmul_rate": fpt * tps / matmul_rate,
        "reference_tokens_per_s": ref,
        "speedup": tps / ref,
        "loss_gap": same_loss(cfg, store, args),
    }


COLUMNS = {
    "model": "s",
    "params": ",",
    "vocab": ",",
    "precision": "s",
    "tokens_per_s": ",.0f",
    "gflops": ",.1f",
    "of_peak": ".0%",
    "matmul_gflops": ",.1f",
    "matmul_of_peak": ".0%",
    "of_matmul_rate": ".0%",
    "reference_tokens_per_s": ",.0f",
    "speedup": ".2f",
    "vs_fp32_reference": ".2f",
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["micro-32", "micro-64", "micro-128", "micro-256", "micro-512", "0.009b"],
    )
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the micro sizes")
    p.add_argument("--window", type=int, default=1, help="steps per timed window")
    p.add_argument("--windows", type=int, default=4, help="timed windows after one warm-up")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--matmul-seconds", type=float, default=0.2, help="timing of each of the step's matmuls"
    )
    add_out(p, "throughput")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    peaks = {name: matmul_peak(DTYPES[name]) for name in args.precisions}
    print(describe(info))
    print(f"batch {args.batch} x seq {args.seq}, micro vocab {args.vocab}")
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            rows.append(measure(size, precision, peaks[precision], args))
            print(f"  {size} {precision}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    for name in peaks:  # contention only lowers a peak: keep the better of the two
        peaks[name] = max(peaks[name], matmul_peak(DTYPES[name]))
    plain = {r["model"]: r["reference_tokens_per_s"] for r in rows if r["precision"] == "fp32"}
    for row in rows:
        row["of_peak"] = row["gflops"] * 1e9 / peaks[row["precision"]]
        row["matmul_of_peak"] = row["matmul_gflops"] * 1e9 / peaks[row["precision"]]
        if row["model"] in plain:  # against the obvious loop as written: fp32, no autocast
            row["vs_fp32_reference"] = row["tokens_per_s"] / plain[row["model"]]
    for name, peak in peaks.items():
        print(f"measured matmul peak {name}: {peak / 1e9:,.1f} GFLOP/s (2048^3)")
    print(table(rows, COLUMNS))
    print(
        f"largest |loss(trainer) - loss(reference)| at equal weights: "
        f"{max(r['loss_gap'] for r in rows):.1e}"
    )
    write(args.out, info, rows, args=vars(args) | {"out": str(args.out)}, peaks=peaks)
    return rows


if __name__ == "__main__":
    main()

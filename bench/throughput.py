"""Training throughput of the micro family against this machine's measured matmul peak.

For each size and precision: tokens/s of the full training step (forward, loss, backward, AdamW
with μP groups, as `trainables.trainer` runs it) and the model FLOP/s it achieves (FLOPs/token
from `trainables.shapes.flops_per_token`, PaLM App. B) divided by the peak FLOP/s of a large
square matmul of the same dtype, measured in the same process with the same threads.

    python bench/throughput.py                          # micro-128, micro-256, micro-512
    python bench/throughput.py --sizes micro-64 0.009b --batch 8 --seq 256 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from trainables.model import MiniCPM, build_optimizer
from trainables.shapes import flops_per_token, get_config, non_embedding_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of an n×n @ n×n matmul (2n³ FLOPs): the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_time(name: str, precision: str, batch: int, seq: int, steps: int) -> float:
    """Median seconds per training step after two warm-up steps."""
    cfg = get_config(name, max_seq_len=max(seq, 128))
    torch.manual_seed(0)
    model = MiniCPM(cfg)
    opt = build_optimizer(model, 0.01)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))
    amp = precision == "bf16"
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["micro-128", "micro-256", "micro-512"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peaks = {name: matmul_peak(DTYPES[name]) for name in args.precisions}
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, batch {args.batch} x seq {args.seq}"
    )
    for name, peak in peaks.items():
        print(f"measured matmul peak {name}: {peak / 1e9:,.1f} GFLOP/s (2048^3)")
    print("\n| model | params (non-emb) | precision | tokens/s | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = get_config(size)
        fpt = flops_per_token(cfg, args.seq)
        for precision in args.precisions:
            dt = step_time(size, precision, args.batch, args.seq, args.steps)
            tps = args.batch * args.seq / dt
            achieved = fpt * tps
            print(
                f"| {size} | {non_embedding_params(cfg):,} | {precision} | {tps:,.0f} | "
                f"{achieved / 1e9:,.1f} | {achieved / peaks[precision]:.0%} |"
            )


if __name__ == "__main__":
    main()

"""MFU of the bf16 training step on a GPU, against the device's own measured matmul peak.

No Ray: this times `trainables` directly (model, μP AdamW, loss, backward, step), for the
0.1B and 0.5B wind-tunnel shapes by default, with and without `torch.compile`. MFU is
model FLOP/s (`flops_per_token`, PaLM App. B) ÷ the best bf16 matmul FLOP/s measured in the
same process (an 8192³ matmul on a GPU), so it is the share of what this device really does.

    python bench/gpu_mfu.py                                   # 0.109b and 0.499b, CUDA, bf16
    python bench/gpu_mfu.py --sizes 0.499b --batch 8 --seq 4096 --no-compile
    python bench/gpu_mfu.py --device cpu --sizes micro-32 --seq 64 --batch 2 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import add_out, machine, write

from trainables.model import MiniCPM, build_optimizer
from trainables.shapes import flops_per_token, get_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, repeats: int = 20) -> float:
    """Best bf16 FLOP/s of an n×n @ n×n matmul (2n³ FLOPs) on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_seconds(
    name: str, device: torch.device, batch: int, seq: int, steps: int, compile_: bool
) -> float:
    """Median seconds of a full bf16-autocast training step after warm-up steps."""
    cfg = get_config(name, max_seq_len=max(seq, 64))
    torch.manual_seed(0)
    model = MiniCPM(cfg).to(device)
    opt = build_optimizer(model, 0.01, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    times = []
    for i in range(steps + 3):  # compile and allocator warm-up happen in the first steps
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del model, opt, forward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["0.109b", "0.499b"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="only the eager step")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak")
    add_out(p, "gpu-mfu")
    args = p.parse_args(argv)
    info = machine()
    device = torch.device(args.device)
    peak_n = args.peak_n or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak(device, peak_n)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name}, torch {torch.__version__}: measured bf16 matmul peak "
        f"{peak / 1e12:,.1f} TFLOP/s ({peak_n}^3); batch {args.batch} x seq {args.seq}"
    )
    print("\n| model | compile | tokens/s | TFLOP/s | MFU |\n|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        fpt = flops_per_token(get_config(size), args.seq)
        for compile_ in [False] if args.no_compile else [False, True]:
            dt = step_seconds(size, device, args.batch, args.seq, args.steps, compile_)
            tps = args.batch * args.seq / dt
            row = {
                "model": size,
                "compile": compile_,
                "tokens_per_s": tps,
                "tflops": fpt * tps / 1e12,
                "mfu": fpt * tps / peak,
            }
            rows.append(row)
            print(
                f"| {size} | {'yes' if compile_ else 'no'} | {tps:,.0f} | "
                f"{row['tflops']:,.1f} | {row['mfu']:.1%} |",
                flush=True,
            )
    extra = {"device": name, "peak_flops": peak, "peak_n": peak_n}
    write(args.out, info | extra, rows, args=vars(args) | {"out": str(args.out)})
    return rows


if __name__ == "__main__":
    main()

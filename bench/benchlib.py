"""What every benchmark here shares: the machine's description, its load, tables and JSON.

A number without its machine and load is not a measurement on a shared box, so every script
prints `machine()` above its table and writes it, with the rows, to the JSON file named by
`--out` (default under /tmp, never into the repository).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from trainables.tokens import TokenStore, token_dtype


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The matrix-unit flags that decide whether bf16 can beat fp32 on this CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [f for f in wanted if f" {f}" in text]


def load() -> tuple[float, float, float]:
    """`uptime`'s 1, 5 and 15 minute load averages."""
    return tuple(round(x, 2) for x in os.getloadavg())


def machine() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_start": load(),
    }


def describe(info: dict) -> str:
    flags = ", ".join(info["cpu_flags"]) or "no AVX-512/AMX"
    return (
        f"{info['date']}: {info['cpu']} ({flags}), {info['cores']} cores, "
        f"torch {info['torch']} with {info['torch_threads']} threads; "
        f"load {info['load_start']} at start"
    )


def add_out(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp") / f"bench-{name}.json", help="results JSON"
    )


def write(path: Path, info: dict, rows: list[dict], **extra) -> None:
    """The JSON record of one run: machine, load at both ends, arguments and rows."""
    info = {**info, "load_end": load()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, **extra, "rows": rows}, indent=1) + "\n")
    print(f"\nload at end {info['load_end']}; results -> {path}")


def table(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of `rows`; `columns` maps each key to its format spec."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    lines = [head]
    for row in rows:
        cells = [
            format(row[k], spec) if row.get(k) is not None else "-" for k, spec in columns.items()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def random_store(vocab_size: int, n_tokens: int = 1 << 20, seed: int = 0) -> TokenStore:
    """Uniform random tokens in memory: speed does not depend on what the tokens say."""
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    train = rng.integers(0, vocab_size, n_tokens).astype(dtype)
    val = rng.integers(0, vocab_size, 1 << 14).astype(dtype)
    meta = {"vocab_size": vocab_size, "n_val_tokens": len(val), "val_bytes": 3 * len(val)}
    return TokenStore("random", train, val, meta)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n×n @ n×n matmul (2n³ FLOPs) over `seconds`: the practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def linear_shapes(model: torch.nn.Module) -> Counter:
    """(in, out) of every linear map a training step runs: the model's `nn.Linear`s and its
    tied head (vocabulary × d), with how often each occurs."""
    shapes = Counter(
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    vocab, d = model.embed_tokens.weight.shape
    shapes[(d, vocab)] += 1
    return shapes


def best_matmul_s(a: torch.Tensor, b: torch.Tensor, seconds: float, reps: int = 3) -> float:
    """Fastest of repeated a @ b calls over at least `seconds` and `reps` calls, after one."""
    a @ b
    best, n, end = float("inf"), 0, time.perf_counter() + seconds
    while n < reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best, n = min(best, time.perf_counter() - t0), n + 1
    return best


def step_matmul_rate(
    model: torch.nn.Module, rows: int, dtype: torch.dtype, seconds: float = 0.2, passes: int = 2
) -> float:
    """FLOP/s of the step's own matmuls at their own shapes: for each linear map (in → out) over
    `rows` tokens, the forward (rows×in @ in×out) and the two backward products (the input's
    gradient rows×out @ out×in, the weight's out×rows @ rows×in), each the fastest call over
    `passes` passes of `seconds` (single calls of a few ms vary by 2× on a shared VM). The
    step's matmul FLOPs divided by this rate is about the least time the step can take on
    this machine, attention's score products and everything else aside."""
    products = Counter()
    for (n_in, n_out), count in linear_shapes(model).items():
        for mkn in ((rows, n_in, n_out), (rows, n_out, n_in), (n_out, rows, n_in)):
            products[mkn] += count
    best = dict.fromkeys(products, float("inf"))
    for _ in range(passes):
        for m, k, n in products:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            best[(m, k, n)] = min(best[(m, k, n)], best_matmul_s(a, b, seconds))
    flops = sum(count * 2 * m * k * n for (m, k, n), count in products.items())
    return flops / sum(count * best[mkn] for mkn, count in products.items())


def start_ray(num_cpus: int = 2) -> None:
    """A private local Ray, as `sandbox_service.study.init_ray` starts it, but without the
    workers' log lines on the terminal (the sandbox's own calls then reuse this instance)."""
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)

"""μP's coordinate check (arXiv 2203.03466 App. D; microsoft/mup ``get_coord_data``).

Train models of growing width a few AdamW steps on one fixed batch and record the mean |x| of the
embedding output, every block's output and the logits. Under μP these curves stay flat in width
after training; under the standard parametrisation they grow (the updates ΔW·x scale like width).

    sandbox coordcheck --widths 64 128 256 512 --out coordcheck.png
    python -m trainables.coordcheck ...   # the same, without the CLI

prints the slope of log mean|x| against log width for each module and writes mup-style plots.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from trainables.model import MiniCPM, build_optimizer
from trainables.shapes import ModelConfig, micro

Record = Mapping[str, object]


def coord_config(width: int, parametrization: str = "mup") -> ModelConfig:
    """micro-<width> at a fixed depth of 2: μP is a width rule, so depth must not vary with it."""
    return micro(width, n_layers=2, parametrization=parametrization)


def _batch(cfg: ModelConfig, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=gen)


@torch.no_grad()
def _coords(model: MiniCPM, idx: torch.Tensor) -> dict[str, float]:
    """Mean |x| of the embedding lookup, each block's output and the logits for one forward."""
    out: dict[str, float] = {}

    def hook(name: str) -> Callable:
        return lambda _mod, _inp, y: out.__setitem__(name, y.abs().mean().item())

    named = [("embedding", model.embed_tokens)]
    named += [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    handles = [mod.register_forward_hook(hook(name)) for name, mod in named]
    try:
        out["logits"] = model(idx).abs().mean().item()
    finally:
        for h in handles:
            h.remove()
    return out


def _train_records(
    cfg: ModelConfig, tokens: torch.Tensor, steps: int, lr: float, seed: int
) -> list[dict]:
    torch.manual_seed(seed)
    model = MiniCPM(cfg)
    opt = build_optimizer(model, lr)
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    records = []
    for step in range(steps + 1):
        if step:
            model(idx, targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for name, l1 in _coords(model, idx).items():
            records.append({"width": cfg.d_model, "step": step, "module": name, "l1": l1})
    return records


def coord_check(
    widths: Sequence[int],
    parametrization: str,
    *,
    steps: int = 4,
    lr: float = 1e-2,
    seed: int = 0,
    batch_size: int = 8,
    seq_len: int = 64,
    base_cfg_fn: Callable[[int, str], ModelConfig] = coord_config,
    tokens: torch.Tensor | None = None,
) -> dict:
    """Records of mean |x| per width, step (0 = init, 1..steps after each update) and module.

    Every width uses the same seed and the same batch ``tokens`` (B, seq_len + 1), by default
    random ids from a generator seeded with ``seed``.
    """
    records: list[dict] = []
    for width in widths:
        cfg = base_cfg_fn(width, parametrization)
        batch = _batch(cfg, batch_size, seq_len, seed) if tokens is None else tokens
        records += _train_records(cfg, batch, steps, lr, seed)
    return {
        "parametrization": parametrization,
        "widths": list(widths),
        "steps": steps,
        "lr": lr,
        "records": records,
    }


def width_slopes(records: Sequence[Record], module: str) -> float:
    """Least-squares slope of log(mean|x|) vs log(width) for ``module`` at the last step.

    0 means width-independent coordinates; 0.5 is a sqrt(width) and 1 a linear blow-up.
    """
    last = max(r["step"] for r in records)
    pts = [
        (math.log(r["width"]), math.log(r["l1"]))
        for r in records
        if r["module"] == module and r["step"] == last
    ]
    if len(pts) < 2:
        raise ValueError(f"module {module!r}: needs records at 2+ widths, found {len(pts)}")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def modules(records: Sequence[Record]) -> list[str]:
    """Module names in recording order (embedding, layers.0.., logits)."""
    return list(dict.fromkeys(r["module"] for r in records))


def plot(results: Sequence[Mapping], path: str) -> None:
    """mup-style grid: one row per coord_check result, one column per step, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_steps = max(res["steps"] for res in results) + 1
    fig, axes = plt.subplots(
        len(results), n_steps, figsize=(3 * n_steps, 3 * len(results)), squeeze=False
    )
    for row, res in zip(axes, results, strict=True):
        for step, ax in enumerate(row):
            _plot_panel(ax, res["records"], step)
            ax.set_title(f"{res['parametrization']} step {step}")
    axes[-1][0].legend(fontsize="x-small")
    fig.supxlabel("width")
    fig.supylabel("mean |x|")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_panel(ax, records: Sequence[Record], step: int) -> None:
    for module in modules(records):
        pts = sorted(
            (r["width"], r["l1"]) for r in records if r["module"] == module and r["step"] == step
        )
        ax.plot([w for w, _ in pts], [y for _, y in pts], marker="o", label=module)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default="coordcheck.png")


def run(args: argparse.Namespace) -> list[dict]:
    """Both parametrisations over args.widths: print the slopes, write the plot."""
    results = [coord_check(args.widths, p, steps=args.steps, lr=args.lr) for p in ("mup", "sp")]
    for res in results:
        slopes = {m: round(width_slopes(res["records"], m), 3) for m in modules(res["records"])}
        print(f"{res['parametrization']}: slope of log mean|x| vs log width: {slopes}")
    plot(results, args.out)
    print(f"wrote {args.out}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

"""`sandbox transfer`: the wind-tunnel studies' fitted laws -> a pretrain spec for a big model.

    sandbox transfer --target minicpm-2.4b \\
        --studies lr-transfer-micro batch-size-micro scaling-micro wsd-micro mup-hparams-micro \\
        --target-loss 2.5 --num-workers 120 --gpu --out pretrain.yaml

Each study is read from `<storage>/<study>/analysis.json` and recognised by its `kind`:
- lr_transfer (required): base lr η = `chosen.lr`; under μP it transfers unchanged across width
  (MiniCPM arXiv 2404.06395, "Optimal Learning Rate"; μTransfer arXiv 2203.03466);
- batch_size (required): `chosen.a, chosen.b` of bs_tokens = a / L^b, evaluated at the target
  loss and rounded to whole micro-batches on every worker;
- scaling: tokens = compute-optimal D/N × N (`chosen.compute_optimal.d_over_n`) and the target
  loss L(N, D) of `laws.loss_nd`, when not given;
- wsd: the decay fraction (`headline["reference fraction"]`) and the decay shape that beat
  cosine by most at that fraction (`decay_vs_cosine`);
- mup_hparams: scale_emb, scale_depth, init_std of the best trial (`chosen.config`).
Every derived value lands in the spec's `derivation` with its source, and the derivation is
printed step by step. Micro-study laws applied to a billion-parameter target are extrapolations:
the spec says so, and a target loss outside a law's fitted range prints a warning.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from sandbox_service import storage
from sandbox_service.laws import BatchSizeLaw, predict_bs
from trainables.data import DataConfig
from trainables.dictconfig import to_dict
from trainables.pretrain_config import PretrainConfig, ScalingConfig
from trainables.shapes import get_config, non_embedding_params

KINDS = ("lr_transfer", "batch_size", "scaling", "wsd", "mup_hparams")
REQUIRED_KINDS = ("lr_transfer", "batch_size")
MUP_FIELDS = ("scale_emb", "scale_depth", "init_std")
DEFAULT_DECAY = (0.1, "exp")  # facts §4: ~0.1T of ~1.1T tokens, exponential decay
EXTRAPOLATION = "a micro-scale law applied to the target: an extrapolation, not a measurement"


class TransferError(ValueError):
    """A study is missing or lacks a field; the message names the file and the field."""


@dataclass(frozen=True)
class Study:
    """One study's analysis.json, with where it came from (for errors and the derivation)."""

    name: str
    source: str
    data: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return str(self.need("kind"))

    @property
    def tag(self) -> str:
        """`name@fingerprint`: which study, and which version of its spec."""
        return f"{self.name}@{self.data.get('fingerprint', '?')}"

    def need(self, *path: str) -> Any:
        """The value at `path`, or a TransferError naming the file and the dotted field."""
        value: Any = self.data
        for i, key in enumerate(path):
            if not isinstance(value, Mapping) or value.get(key) is None:
                dotted = ".".join(path[: i + 1])
                raise TransferError(
                    f"{self.source}: field `{dotted}` is missing; re-run `sandbox report "
                    f"{self.name}` or pass the value on the command line"
                )
            value = value[key]
        return value


def load_study(root: str, name: str) -> Study:
    url = storage.join(root, name, "analysis.json")
    if not storage.exists(url):
        raise TransferError(
            f"{url}: no such file; study {name!r} has no analysis (run `sandbox report {name}`, "
            f"or check --storage {root})"
        )
    try:
        data = json.loads(storage.read_text(url))
    except json.JSONDecodeError as e:
        raise TransferError(f"{url}: not valid JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise TransferError(f"{url}: expected a JSON object, got {type(data).__name__}")
    return Study(name, url, data)


def by_kind(studies: Sequence[Study], required: Sequence[str] = REQUIRED_KINDS) -> dict[str, Study]:
    """Studies keyed by kind; two of one kind, an unknown kind or a missing required one refuse."""
    out: dict[str, Study] = {}
    for study in studies:
        kind = study.kind
        if kind not in KINDS:
            raise TransferError(f"{study.source}: field `kind`={kind!r}: allowed {KINDS}")
        if kind in out:
            raise TransferError(f"studies {out[kind].name} and {study.name} are both {kind!r}")
        out[kind] = study
    for kind in required:
        if kind not in out:
            given = ", ".join(s.name for s in studies) or "none"
            raise TransferError(f"a {kind!r} study is required (given: {given})")
    return out


@dataclass(frozen=True)
class TransferOptions:
    """What the command line chooses; None means 'derive it from a study'."""

    target: str = "minicpm-2.4b"
    seq_len: int = 4096
    num_workers: int = 1
    micro_batch_size: int = 1
    use_gpu: bool = False
    tokens: float | None = None
    target_loss: float | None = None
    decay_fraction: float | None = None
    warmup_fraction: float = 0.01  # MiniCPM's warmup is unpublished: 1% of steps is a choice
    strategy: str = "ddp"  # `sandbox plan` says when fsdp is needed
    data_sources: tuple[str, ...] | None = None  # None: DataConfig's default
    name: str | None = None
    global_batch_tokens: int | None = None  # fixes the batch; the batch-size study is not needed

    def __post_init__(self):
        for name in ("seq_len", "num_workers", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise TransferError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.tokens is not None and not self.tokens >= 1:
            raise TransferError(f"tokens={self.tokens}: must be >= 1")
        if self.target_loss is not None and not self.target_loss > 0:
            raise TransferError(f"target_loss={self.target_loss}: must be > 0")
        if self.global_batch_tokens is not None and self.global_batch_tokens < 1:
            raise TransferError(f"global_batch_tokens={self.global_batch_tokens}: must be >= 1")
        if not 0 <= self.warmup_fraction < 1:
            raise TransferError(f"warmup_fraction={self.warmup_fraction}: must be in [0, 1)")


@dataclass
class Derivation:
    """The steps in order: each a field, its value and the sentence saying where it came from."""

    steps: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, reason: str) -> None:
        self.steps[key] = reason
        self.lines.append(f"{len(self.steps)}. {key} = {value}\n     {reason}")

    def note(self, line: str) -> None:
        self.lines.append(f"     {line}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.lines.append(f"     WARNING: {text}")


# --- the derivation, one field at a time -------------------------------------------------------


def derive_lr(lr: Study, d: Derivation) -> float:
    value = float(lr.need("chosen", "lr"))
    rule = lr.data["chosen"].get("rule", "?")
    d.add(
        "lr",
        f"{value:.4g}",
        f"{lr.tag}: chosen.lr = {value:.4g} (μP lr*, rule {rule!r}); under "
        "μP the base lr transfers unchanged to any width",
    )
    return value


def derive_mup(target: str, mup: Study | None, d: Derivation) -> dict:
    model: dict[str, Any] = {"preset": target}
    if mup is None:
        cfg = get_config(target)
        shown = ", ".join(f"{k} {getattr(cfg, k):g}" for k in MUP_FIELDS)
        d.add("model", model, f"preset {target}: μP constants {shown} (no mup_hparams study given)")
        return model
    config = mup.need("chosen", "config")
    for key in MUP_FIELDS:
        model[key] = float(mup.need("chosen", "config", f"model.{key}"))
    shown = ", ".join(f"{k} {model[k]:.4g}" for k in MUP_FIELDS)
    own_lr = config.get("train.lr")
    unused = f"; its lr {own_lr:.4g} is not used (lr comes from the lr study)" if own_lr else ""
    d.add(
        "model",
        model,
        f"{mup.tag}: best trial {mup.data['chosen'].get('trial_id', '?')} (chosen.config): "
        f"{shown}; μP constants are width-free{unused}",
    )
    return model


def derive_tokens(opts: TransferOptions, n: int, scaling: Study | None, d: Derivation) -> int:
    if opts.tokens is not None:
        d.add("tokens", f"{opts.tokens:.4g}", "given on the command line (--tokens)")
        return round(opts.tokens)
    if scaling is None:
        raise TransferError("tokens: give --tokens, or a scaling study (for D/N × N)")
    opt = scaling.need("chosen", "compute_optimal")
    ratio = float(scaling.need("chosen", "compute_optimal", "d_over_n"))
    tokens = round(ratio * n)
    d.add(
        "tokens",
        f"{tokens:.4g}",
        f"{scaling.tag}: compute-optimal D/N = {ratio:.4g} (at C = "
        f"{opt.get('compute', float('nan')):.3g} FLOPs) × N {n:,}; {EXTRAPOLATION}",
    )
    return tokens


def derive_target_loss(
    opts: TransferOptions, n: int, tokens: int, bs: Study, scaling: Study | None, d: Derivation
) -> float:
    metric = bs.data.get("metric", "the batch study's metric")
    if opts.target_loss is not None:
        d.add("target_loss", opts.target_loss, f"given on the command line, in {metric}")
        return float(opts.target_loss)
    if scaling is None:
        raise TransferError(
            f"target loss: give --target-loss (in {metric}, the metric of {bs.name}'s "
            "batch-size law) or a scaling study"
        )
    if scaling.data.get("metric") != bs.data.get("metric"):
        raise TransferError(
            f"target loss: {scaling.name} measures {scaling.data.get('metric')} but {bs.name}'s "
            f"law is in {metric}; give --target-loss in {metric}"
        )
    law = {k: float(scaling.need("laws", "loss_nd", k)) for k in ("c_n", "alpha", "c_d", "beta")}
    l0 = float(scaling.need("laws", "loss_nd", "l0"))
    loss = law["c_n"] * n ** -law["alpha"] + law["c_d"] * tokens ** -law["beta"] + l0
    d.add(
        "target_loss",
        f"{loss:.4g}",
        f"{scaling.tag}: L(N, D) = {law['c_n']:.4g}·N^-"
        f"{law['alpha']:.3g} + {law['c_d']:.4g}·D^-{law['beta']:.3g} + {l0:.3g} at N {n:,}, "
        f"D {tokens:.4g} = {loss:.4g}; {EXTRAPOLATION}",
    )
    fitted_n = scaling.data["laws"]["loss_nd"].get("n_range")
    if fitted_n and n > fitted_n[1]:
        d.warn(f"N {n:,} is {n / fitted_n[1]:,.0f}× the largest N the L(N, D) law was fitted on")
    return loss


def round_batch(raw_tokens: float, unit: int) -> int:
    """The nearest whole number of `unit`s (seq_len × workers × micro-batch), at least one."""
    return max(1, round(raw_tokens / unit)) * unit


def derive_batch(bs: Study, loss: float, opts: TransferOptions, d: Derivation) -> int:
    a, b = float(bs.need("chosen", "a")), float(bs.need("chosen", "b"))
    fitted = bs.data.get("laws", {}).get("batch_size_law", {}).get("loss_range")
    loss_range = tuple(fitted) if fitted else (math.nan, math.nan)
    law = BatchSizeLaw(a=a, b=b, residuals=(), r2=math.nan, n_points=0, loss_range=loss_range)
    raw = predict_bs(law, loss)
    unit = opts.seq_len * opts.num_workers * opts.micro_batch_size
    batch = round_batch(raw, unit)
    d.add(
        "global_batch_tokens",
        f"{batch:,}",
        f"{bs.tag}: bs = {a:.5g} / L^{b:.4g} = {raw:,.0f} "
        f"tokens at L = {loss:.4g}, rounded to a multiple of seq_len {opts.seq_len} × "
        f"{opts.num_workers} workers × micro-batch {opts.micro_batch_size} = {unit:,}; "
        f"{EXTRAPOLATION}",
    )
    if not fitted:
        d.warn(f"{bs.source}: no laws.batch_size_law.loss_range; cannot tell extrapolation")
    elif not loss_range[0] <= loss <= loss_range[1]:
        d.warn(
            f"target loss {loss:.4g} lies outside the bs law's fitted losses "
            f"[{loss_range[0]:.4g}, {loss_range[1]:.4g}]: the batch is extrapolated"
        )
    if raw < unit / 2:
        d.warn(
            f"the law's {raw:,.0f} tokens are under half of one sequence per worker "
            f"({unit:,}): the batch is that floor, not the law's value"
        )
    return batch


def given_batch(opts: TransferOptions, d: Derivation) -> int:
    """A batch fixed by the user (hardware, or a proxy run too small for the bs law)."""
    unit = opts.seq_len * opts.num_workers * opts.micro_batch_size
    if opts.global_batch_tokens % unit:
        raise TransferError(
            f"global_batch_tokens={opts.global_batch_tokens}: must be a multiple of seq_len "
            f"{opts.seq_len} × {opts.num_workers} workers × micro-batch {opts.micro_batch_size}"
            f" = {unit}"
        )
    d.add("global_batch_tokens", f"{opts.global_batch_tokens:,}", "given, not derived from a law")
    return opts.global_batch_tokens


def derive_schedule(opts: TransferOptions, wsd: Study | None, d: Derivation) -> tuple[float, str]:
    if opts.decay_fraction is not None:
        d.add("decay_fraction", opts.decay_fraction, "given on the command line")
        d.add("decay_shape", DEFAULT_DECAY[1], "MiniCPM-2.4B's exponential anneal (paper §4)")
        return opts.decay_fraction, DEFAULT_DECAY[1]
    if wsd is None:
        d.add("decay_fraction", DEFAULT_DECAY[0], "MiniCPM: ~0.1T decay of ~1.1T tokens (no wsd)")
        d.add("decay_shape", DEFAULT_DECAY[1], "MiniCPM-2.4B's exponential anneal (no wsd study)")
        return DEFAULT_DECAY
    fraction = float(wsd.need("headline", "reference fraction"))
    rows = [r for r in wsd.need("decay_vs_cosine") if r.get("decay_fraction") == fraction]
    if not rows:
        raise TransferError(f"{wsd.source}: field `decay_vs_cosine` has no row at {fraction}")
    best = min(rows, key=lambda r: r["mean"])
    d.add("decay_fraction", fraction, f"{wsd.tag}: headline['reference fraction']")
    d.add(
        "decay_shape",
        best["decay_shape"],
        f"{wsd.tag}: at decay {fraction:g}, WSD − cosine "
        f"= {best['mean']:+.4f} mean over branch steps, the best shape",
    )
    return fraction, best["decay_shape"]


def derive_warmup(opts: TransferOptions, tokens: int, batch: int, d: Derivation) -> int:
    steps = max(1, round(tokens / batch))
    warmup = min(round(opts.warmup_fraction * steps), steps - 1)
    d.add(
        "warmup_steps",
        warmup,
        f"{opts.warmup_fraction:g} of {steps:,} steps (a choice: "
        "MiniCPM does not publish its warmup)",
    )
    return warmup


def mup_sanity(target: str, lr: float, d: Derivation) -> None:
    cfg = get_config(target)
    mult = cfg.width_mult
    d.note(
        f"μP: d/d_base = {cfg.d_model}/{cfg.dim_model_base} = {mult:.4g}; hidden matrices "
        f"train at η·d_base/d = {lr:.4g}/{mult:.4g} = {lr / mult:.4g}, embedding and norms at "
        f"η = {lr:.4g}; logits are divided by {mult:.4g}"
    )


# --- the whole transfer ------------------------------------------------------------------------


def transfer(studies: Sequence[Study], opts: TransferOptions) -> tuple[PretrainConfig, Derivation]:
    """The pretrain spec for `opts.target` from the studies, and its derivation."""
    fixed_batch = opts.global_batch_tokens is not None
    kinds = by_kind(studies, ("lr_transfer",) if fixed_batch else REQUIRED_KINDS)
    d = Derivation()
    cfg = get_config(opts.target)
    n = non_embedding_params(cfg)
    lr = derive_lr(kinds["lr_transfer"], d)
    mup_sanity(opts.target, lr, d)
    model = derive_mup(opts.target, kinds.get("mup_hparams"), d)
    tokens = derive_tokens(opts, n, kinds.get("scaling"), d)
    if fixed_batch:
        batch = given_batch(opts, d)
    else:
        loss = derive_target_loss(opts, n, tokens, kinds["batch_size"], kinds.get("scaling"), d)
        batch = derive_batch(kinds["batch_size"], loss, opts, d)
    fraction, shape = derive_schedule(opts, kinds.get("wsd"), d)
    warmup = derive_warmup(opts, tokens, batch, d)
    spec = PretrainConfig(
        name=opts.name or f"{opts.target}-pretrain",
        model=model,
        lr=lr,
        global_batch_tokens=batch,
        seq_len=opts.seq_len,
        tokens=tokens,
        data=_data(opts, cfg.vocab_size),
        micro_batch_size=opts.micro_batch_size,
        warmup_steps=warmup,
        decay_fraction=fraction,
        decay_shape=shape,
        scaling=ScalingConfig(opts.num_workers, opts.use_gpu, opts.strategy),
        derivation=dict(d.steps),
    )
    d.note(f"steps: {spec.total_steps:,} of {batch:,} tokens; decay from step {spec.decay_start:,}")
    return spec, d


def _data(opts: TransferOptions, vocab_size: int) -> DataConfig:
    """The model's vocabulary follows the tokenizer's (data.vocab_size), so they are set equal."""
    data = replace(DataConfig(), vocab_size=vocab_size)
    return replace(data, sources=opts.data_sources) if opts.data_sources else data


def dump_spec(spec: PretrainConfig) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False, allow_unicode=True)


# --- command line ------------------------------------------------------------------------------


def add_transfer_parser(subparsers) -> None:
    """Add `transfer` to the `sandbox` command's subparsers."""
    p = subparsers.add_parser(
        "transfer",
        help="derive a pretrain spec for a big model from the wind-tunnel studies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default="minicpm-2.4b", help="model preset (default minicpm-2.4b)")
    p.add_argument("--studies", nargs="+", required=True, help="study names under --storage")
    p.add_argument("--storage", default=storage.DEFAULT_ROOT, help="root of the studies")
    p.add_argument("--tokens", type=float, help="training tokens (default: scaling study D/N·N)")
    p.add_argument("--target-loss", type=float, help="loss at which to read the bs law")
    p.add_argument(
        "--global-batch-tokens", type=int, help="fix the batch (then no batch-size study is needed)"
    )
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per worker pass")
    p.add_argument("--gpu", action="store_true", help="train on GPUs")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--data", nargs="+", help="pretraining corpus paths/URLs (data.sources)")
    p.add_argument("--decay-fraction", type=float, help="default: wsd study, else 0.1")
    p.add_argument("--warmup-fraction", type=float, default=0.01, help="share of steps")
    p.add_argument("--name", help="spec name (default <target>-pretrain)")
    p.add_argument("--out", required=True, help="where to write the spec YAML")
    p.set_defaults(fn=cmd_transfer)


def cmd_transfer(args: argparse.Namespace) -> int:
    studies = [load_study(args.storage, name) for name in args.studies]
    opts = TransferOptions(
        target=args.target,
        seq_len=args.seq_len,
        num_workers=args.num_workers,
        micro_batch_size=args.micro_batch_size,
        use_gpu=args.gpu,
        tokens=args.tokens,
        target_loss=args.target_loss,
        decay_fraction=args.decay_fraction,
        warmup_fraction=args.warmup_fraction,
        strategy=args.strategy,
        data_sources=tuple(args.data) if args.data else None,
        name=args.name,
        global_batch_tokens=args.global_batch_tokens,
    )
    spec, d = transfer(studies, opts)
    print(f"transfer to {opts.target} from {', '.join(s.tag for s in studies)}")
    print("\n".join(d.lines))
    storage.write_text(args.out, dump_spec(spec))
    print(f"wrote {args.out}" + (f" ({len(d.warnings)} warnings)" if d.warnings else ""))
    return 0

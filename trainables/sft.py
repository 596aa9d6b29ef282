"""Supervised fine-tuning: a model folder in, a chat model folder out (MiniCPM's SFT stage).

MiniCPM (arXiv 2404.06395, facts §4) fine-tunes the annealed model on SFT data only, with the
loss on responses only, at a learning rate that continues from the anneal's end (1e-3 → 1e-4,
WSD). This stage:

1. loads the model folder `init`, appends the chat tokens `<用户>` `<AI>` to its tokenizer and
   grows the tied embedding to match (`trainables.chat`);
2. trains on packed conversations (`trainables.sft_data`) with the project's μP AdamW groups:
   SFT keeps μP's d_base/d factor on hidden matrices (the model was pretrained with it);
3. checkpoints every `checkpoint_every` steps under `work_dir`, so a killed run resumes with the
   same loss curve (batches are a function of (seed, step), the optimizer state is saved);
4. writes the model folder `out` (stage "sft") atomically and removes `work_dir`.
A second call with a complete `out` returns its metrics without training.

    python -m trainables.sft runs/x/anneal/model runs/x/sft/model --steps 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainables import checkpoint as ckpt
from trainables.artifact import load_model_dir, read_state, save_model_dir
from trainables.chat import IGNORE, add_chat_tokens, resize_embeddings
from trainables.dictconfig import to_dict
from trainables.model import MiniCPM, build_optimizer, set_lr
from trainables.schedules import DECAY_SHAPES, ScheduleConfig, lr_at
from trainables.sft_data import EMBEDDED_SFT, SFTData, build_sft_data
from trainables.trainer import PRECISIONS, autocast_dtype

Report = Callable[[dict], None]
STAGE = "sft"
RESUME_DIR = "last"  # the one rolling checkpoint under work_dir


@dataclass(frozen=True)
class SFTConfig:
    """What the SFT stage trains on and how. Without `steps` or `tokens`: one epoch of the packed
    training rows. `tokens` counts row tokens (batch_size · seq_len per step, padding included).
    """

    sources: tuple[str, ...] = (EMBEDDED_SFT,)  # JSONL paths, URLs, globs or EMBEDDED_SFT
    seq_len: int = 256  # tokens per packed row; at most the model's max_seq_len
    batch_size: int = 16  # rows per optimizer step
    steps: int | None = None
    tokens: int | None = None
    lr_start: float = 1e-3  # η: the anneal's end lr (MiniCPM-2.4B: 1e-2 → 1e-3, then SFT)
    lr_end: float = 1e-4  # where the WSD decay ends (facts §4: 1e-3 → 1e-4)
    decay_fraction: float = 0.1  # WSD decays over this share of the steps (MiniCPM: ~10%)
    decay_shape: str = "exp"  # MiniCPM's exponential anneal; see schedules.DECAY_SHAPES
    # The optimizer state starts fresh (model folders carry none); MiniCPM publishes no SFT
    # warmup, so none by default.
    warmup_steps: int = 0
    weight_decay: float = 0.1  # AdamW decay on matrices and the embedding (OpenBMB's engine)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    val_fraction: float = 0.05  # share of conversations (by content hash) held out
    eval_every: int = 50  # steps between held-out evaluations and reports
    eval_rows: int | None = 256  # held-out rows per evaluation (the first ones); None: all
    checkpoint_every: int = 50  # steps between resumable checkpoints; 0: never
    seed: int = 0  # the split, the packing order and the batches
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU
    # True: a packed conversation attends only to itself (a block-diagonal causal mask from the
    # <s> that starts each one), as if trained alone; False: causal over the whole row, cheaper
    # (fused causal kernels) but a conversation also sees the ones packed before it.
    per_conversation_attention: bool = False
    # torch intra-op threads during the run (restored after); 0 leaves the process setting. At
    # micro sizes on a busy machine 1 thread is ~7x cheaper in CPU time than 2 (spin-waiting).
    threads: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "betas", tuple(self.betas))
        for name, ok, allowed in _RULES:
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"SFTConfig.{name}={value!r} is invalid: must be {allowed}")
        if self.steps is not None and self.tokens is not None:
            raise ValueError(
                f"SFTConfig: give steps={self.steps} or tokens={self.tokens}, not both"
            )
        self.schedule()  # the schedule's own checks (e.g. exp decay needs lr_end > 0)

    def schedule(self) -> ScheduleConfig:
        """WSD from lr_start to lr_end: min_lr_ratio = lr_end / lr_start."""
        try:
            return ScheduleConfig(
                kind="wsd",
                warmup_steps=self.warmup_steps,
                min_lr_ratio=self.lr_end / self.lr_start,
                decay_fraction=self.decay_fraction,
                decay_shape=self.decay_shape,
            )
        except ValueError as err:
            raise ValueError(f"SFTConfig (lr_end / lr_start is min_lr_ratio): {err}") from err

    def total_steps(self, n_train_rows: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))
        return max(1, n_train_rows // self.batch_size)


def _int(low: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RULES = (
    ("sources", lambda v: bool(v) and all(isinstance(s, str) and s for s in v), "non-empty strs"),
    ("seq_len", _int(2), "an int >= 2"),
    ("batch_size", _int(1), "an int >= 1"),
    ("steps", lambda v: v is None or _int(1)(v), "None or an int >= 1"),
    ("tokens", lambda v: v is None or _int(1)(v), "None or an int >= 1"),
    ("lr_start", lambda v: _real(v) and v > 0, "a finite number > 0"),
    ("lr_end", lambda v: _real(v) and v >= 0, "a finite number >= 0 (and <= lr_start)"),
    ("decay_shape", lambda v: v in DECAY_SHAPES, f"one of {DECAY_SHAPES}"),
    ("warmup_steps", _int(0), "an int >= 0"),
    ("weight_decay", lambda v: _real(v) and v >= 0, "a number >= 0"),
    ("grad_clip", lambda v: _real(v) and v >= 0, "a number >= 0 (0 disables clipping)"),
    ("betas", lambda v: len(v) == 2 and all(_real(b) and 0 <= b < 1 for b in v), "2 in [0, 1)"),
    ("eps", lambda v: _real(v) and v > 0, "a number > 0"),
    ("val_fraction", lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)"),
    ("eval_every", _int(1), "an int >= 1"),
    ("eval_rows", lambda v: v is None or _int(1)(v), "None or an int >= 1"),
    ("checkpoint_every", _int(0), "an int >= 0 (0: never)"),
    ("seed", lambda v: _int(0)(v) and v < 2**63, "an int in [0, 2**63)"),
    ("precision", lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
    ("threads", _int(0), "an int >= 0 (0: leave torch's setting)"),
    ("per_conversation_attention", lambda v: isinstance(v, bool), "true or false"),
)


# --- the held-out loss ------------------------------------------------------------------------


@torch.no_grad()
def response_loss(
    model: MiniCPM, data: SFTData, cfg: SFTConfig, amp: torch.dtype | None, dev: torch.device
) -> float:
    """Mean cross-entropy (nats) over the held-out response tokens of the first eval_rows rows."""
    model.eval()
    n_rows = min(data.val.n_rows, cfg.eval_rows or data.val.n_rows)
    total, count = 0.0, 0
    for start in range(0, n_rows, cfg.batch_size):
        x, y = data.val.rows(torch.arange(start, min(start + cfg.batch_size, n_rows)).numpy())
        x = x.to(dev)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x, segments=segments(x, cfg, data.bos_id))  # (B, T, V)
        y = y.to(dev)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += int((y != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def segments(inputs: torch.Tensor, cfg: SFTConfig, bos_id: int) -> torch.Tensor | None:
    """The conversation index of every input position when `per_conversation_attention`: each
    packed conversation starts with <s> (`chat.encode_chat`), padding joins the last one."""
    if not cfg.per_conversation_attention:
        return None
    return (inputs == bos_id).cumsum(dim=1)


# --- the stage --------------------------------------------------------------------------------


def run_sft(
    cfg: SFTConfig,
    init: str,
    out: str,
    *,
    work_dir: str | None = None,
    report: Report | None = None,
) -> dict:
    """Fine-tune the model folder `init` into the model folder `out`; returns the final metrics
    (step, train_loss, val_loss, val_loss_init, tokens, response_tokens, wall_s, ...)."""
    finished = _finished_metrics(Path(out))
    if finished is not None:
        return finished
    work = Path(work_dir) if work_dir is not None else Path(f"{out}.work")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads or threads)
        run = _Run(cfg, init, report)
        run.resume_or_start(work / RESUME_DIR)
        metrics = run.train(work / RESUME_DIR)
    finally:
        torch.set_num_threads(threads)
    lineage = {
        "init": str(init),
        "init_stage": run.init_state.get("stage"),
        "init_manifest_sha256": run.init_sha256,
        "sources": list(cfg.sources),
    }
    save_model_dir(
        out,
        run.model.cpu(),
        run.tok,
        stage=STAGE,
        lineage=lineage,
        metrics=metrics,
        extra={"sft_config": to_dict(cfg)},
    )
    shutil.rmtree(work, ignore_errors=True)  # the optimizer state is no longer needed
    return metrics


def _finished_metrics(out: Path) -> dict | None:
    """The metrics of a complete SFT folder at `out`; None when there is nothing there yet."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / ckpt.MANIFEST_FILE).exists():
        raise ckpt.CheckpointError(
            f"{out}: exists but is not a complete model folder (no {ckpt.MANIFEST_FILE}); "
            "remove it or choose another output"
        )
    state = read_state(out)
    if state.get("stage") != STAGE:
        raise ValueError(f"{out}: holds a {state.get('stage')!r} model, not {STAGE!r} output")
    return state["metrics"]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Run:
    """One SFT run's model, data, optimizer and loop state; split so each phase stays short."""

    cfg: SFTConfig
    init: str
    report: Report | None
    state: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter()  # wall_s counts loading and packing too
        self.dev = _device()
        self.amp = autocast_dtype(self.cfg.precision, self.dev)
        loaded = load_model_dir(self.init)
        self.init_state = loaded.state
        self.init_sha256 = _sha256(Path(self.init) / ckpt.MANIFEST_FILE)
        self.tok = add_chat_tokens(loaded.tokenizer)
        self.model = _chat_model(loaded.model, self.tok.vocab_size, self.cfg).to(self.dev)
        self.data = build_sft_data(
            self.cfg.sources,
            self.tok,
            self.cfg.seq_len,
            val_fraction=self.cfg.val_fraction,
            seed=self.cfg.seed,
        )
        self.total_steps = self.cfg.total_steps(self.data.train.n_rows)
        self.schedule = self.cfg.schedule()
        self.opt = build_optimizer(
            self.model,
            self.cfg.lr_start,
            betas=self.cfg.betas,
            eps=self.cfg.eps,
            weight_decay=self.cfg.weight_decay,
        )

    def identity(self) -> dict:
        """What a resumable checkpoint must match: whatever shapes the loss curve."""
        curve_free = ("eval_every", "eval_rows", "checkpoint_every", "threads")
        config = {k: v for k, v in to_dict(self.cfg).items() if k not in curve_free}
        return {
            "sft_config": config,
            "init_manifest_sha256": self.init_sha256,
            "train_rows_sha256": hashlib.sha256(self.data.train.ids.tobytes()).hexdigest(),
        }

    def resume_or_start(self, last: Path) -> None:
        if (last / ckpt.MANIFEST_FILE).exists():
            self.state = ckpt.load_checkpoint(last, self.model, self.opt)
            if self.state["identity"] != self.identity():
                raise ValueError(
                    f"{last}: a checkpoint of another SFT run (config, init model or data "
                    "differ); remove the work folder or pass another work_dir"
                )
            return
        val = response_loss(self.model, self.data, self.cfg, self.amp, self.dev)
        self.state = {
            "identity": self.identity(),
            "step": 0,
            "val_loss_init": val,
            "window_loss": 0.0,
            "window_steps": 0,
            "response_tokens": 0,
            "elapsed_s": 0.0,
        }

    def wall_s(self) -> float:
        """Seconds of this run so far, earlier processes of a resumed run included."""
        return self.state["elapsed_s"] + time.perf_counter() - self.t0

    def train(self, last: Path) -> dict:
        metrics: dict = {}
        while self.state["step"] < self.total_steps:
            self.step()
            step = self.state["step"]
            if step == self.total_steps or step % self.cfg.eval_every == 0:
                val = response_loss(self.model, self.data, self.cfg, self.amp, self.dev)
                metrics = self.metrics(val)
            every = self.cfg.checkpoint_every
            if every and step % every == 0 and step < self.total_steps:
                state = {**self.state, "elapsed_s": self.wall_s()}
                ckpt.save_checkpoint(last, self.model, self.opt, state)
            if self.report is not None and metrics.get("step") == step:
                self.report(metrics)
        return metrics

    def step(self) -> None:
        step = self.state["step"]
        lr = lr_at(step, self.total_steps, self.cfg.lr_start, self.schedule)
        set_lr(self.opt, lr)
        x, y = self.data.batch(self.cfg.batch_size, self.cfg.seed, step)
        amp = self.amp is not None
        x = x.to(self.dev)
        with torch.autocast(self.dev.type, dtype=self.amp or torch.float32, enabled=amp):
            loss = self.model(x, y.to(self.dev), segments(x, self.cfg, self.data.bos_id))
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.update(step=step + 1, lr=lr)
        self.state["window_loss"] += loss.item()
        self.state["window_steps"] += 1
        self.state["response_tokens"] += int((y != IGNORE).sum())

    def metrics(self, val_loss: float) -> dict:
        """The report at the current step; resets the training-loss window."""
        s, wall = self.state, self.wall_s()
        tokens = s["step"] * self.cfg.batch_size * self.cfg.seq_len
        train_loss = s["window_loss"] / s["window_steps"]
        s["window_loss"], s["window_steps"] = 0.0, 0
        return {
            "step": s["step"],
            "total_steps": self.total_steps,
            "lr": s["lr"],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_loss_init": s["val_loss_init"],
            "tokens": tokens,
            "response_tokens": s["response_tokens"],
            "train_conversations": self.data.train.n_conversations,
            "val_conversations": self.data.val.n_conversations,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
        }


def _chat_model(model: MiniCPM, vocab_size: int, cfg: SFTConfig) -> MiniCPM:
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(
            f"SFTConfig.seq_len={cfg.seq_len} exceeds the model's max_seq_len="
            f"{model.cfg.max_seq_len}; lower seq_len"
        )
    if vocab_size > model.cfg.vocab_size:
        model = resize_embeddings(model, vocab_size)
    return model.train()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune a model folder on SFT data.")
    parser.add_argument("init", help="the model folder to start from")
    parser.add_argument("out", help="the model folder to write")
    parser.add_argument("--sources", nargs="+", default=[EMBEDDED_SFT])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    cfg = SFTConfig(
        sources=tuple(args.sources),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    report = lambda m: print(json.dumps(m))  # noqa: E731
    print(json.dumps(run_sft(cfg, args.init, args.out, report=report), indent=1))


if __name__ == "__main__":
    main()

"""Direct Preference Optimization of a model folder (Rafailov et al. 2023, arXiv 2305.18290).

DPO trains the policy πθ directly on preference pairs (x, y_w, y_l), against a frozen copy of
its starting point, the reference π_ref, with the loss of eq. 7:

    L = −log σ( β·[(log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))] )

β·(log πθ(y|x) − log π_ref(y|x)) is the implicit reward of a response (§5); the pair is ranked
right when the chosen reward exceeds the rejected one (reward accuracy), by the reward margin.

MiniCPM's DPO stage (facts §4): UltraFeedback pairs, 1 epoch, lr 1e-5, cosine schedule, and no
μP learning-rate scaling: μP's d_base/d factor exists to carry a tuned pretraining lr across
widths; the published DPO lr is an absolute value for the one released model, applied to every
parameter. β is unpublished; 0.1 is the DPO paper's and Zephyr's choice.

`run_dpo` reads an SFT model folder, checkpoints every K steps under a work folder (a killed run
resumes exactly: batches are a pure function of (seed, step)) and writes a "dpo" model folder.

    metrics = run_dpo(DPOConfig(), "runs/x/sft/model", "runs/x/dpo/model")
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables import checkpoint as ckpt
from trainables.artifact import load_model_dir, read_state, save_model_dir
from trainables.chat import IGNORE, add_chat_tokens, encode_chat, prompt_ids, resize_embeddings
from trainables.dictconfig import to_dict
from trainables.model import MiniCPM, param_groups
from trainables.preference_data import (
    EMBEDDED,
    PreferencePair,
    epoch_order,
    load_pairs,
    split_pairs,
)
from trainables.schedules import ScheduleConfig, lr_at
from trainables.tokenizer import Tokenizer
from trainables.trainer import PRECISIONS, OptimizerConfig, autocast_dtype

Report = Callable[[dict, "Path | None"], None]
STATS = ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")

# --- the loss: pure functions --------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards), each (B,), from summed log-probs of shape (B,).

    losses = −log σ(β·((πc − rc) − (πr − rr))) (eq. 7), through logsigmoid, which never forms
    σ and so stays finite for any margin; rewards β·(π − r) (§5) are detached: they are reported,
    not trained. The batch loss is losses.mean(); it is ln 2 when policy and reference agree.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (B,) log πθ/π_ref of y_w
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # (B,) of y_l
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(model: MiniCPM, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(labels[t] | ids[:t]) per row, (B,) float32; positions with label −100 add 0.

    ids, labels (B, T) aligned as `chat.encode_chat` returns them: the model reads ids[:, :-1]
    and is scored on labels[:, 1:].
    """
    logits = model(ids[:, :-1])  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return -nll.view_as(targets).sum(dim=-1)


def pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """Batch sums of what is reported: loss, reward accuracy (ties count as wrong, so 0 at step 0,
    as in the DPO reference code), reward margin, and the policy's summed log-probs."""
    return {
        "loss": losses.sum().item(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().sum().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).sum().item(),
        "chosen_logps": chosen_logps.sum().item(),
        "rejected_logps": rejected_logps.sum().item(),
        "pairs": float(losses.numel()),
    }


def mean_stats(sums: dict, prefix: str) -> dict:
    n = max(sums.get("pairs", 0.0), 1.0)
    return {f"{prefix}{k}": sums.get(k, 0.0) / n for k in STATS}


# --- pairs as token ids ---------------------------------------------------------------------------


def truncate_pair(
    prompt: list[int],
    responses: Sequence[tuple[list[int], list[int]]],
    seq_len: int,
    max_prompt_len: int,
    bos_id: int,
) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Fit prompt + each response (ids, labels) into seq_len tokens.

    When the longest pair is too long, the prompt keeps its last max_prompt_len tokens (its end,
    the latest turn and the assistant marker, matters most; a leading <s> is kept), then each
    response keeps its first seq_len − len(prompt) tokens. Both responses share one prompt.
    """
    longest = max(len(ids) for ids, _ in responses)
    if len(prompt) + longest > seq_len and len(prompt) > max_prompt_len:
        head = prompt[:1] if prompt[0] == bos_id else []
        prompt = head + prompt[len(prompt) - max_prompt_len + len(head) :]
    room = seq_len - len(prompt)
    return prompt, [(ids[:room], labels[:room]) for ids, labels in responses]


def encode_pair(tok: Tokenizer, pair: PreferencePair, seq_len: int, max_prompt_len: int) -> tuple:
    """(chosen ids, chosen labels, rejected ids, rejected labels), truncated to seq_len."""
    prompt = prompt_ids(tok, pair.prompt)
    tails = []
    for response in (pair.chosen, pair.rejected):
        ids, labels = encode_chat(tok, [*pair.prompt, {"role": "assistant", "content": response}])
        if ids[: len(prompt)] != prompt:
            raise ValueError(f"{pair.where}: the chat template does not extend the prompt's ids")
        tails.append((ids[len(prompt) :], labels[len(prompt) :]))
    prompt, tails = truncate_pair(prompt, tails, seq_len, max_prompt_len, tok.bos_id)
    (c_ids, c_labels), (r_ids, r_labels) = tails
    masked = [IGNORE] * len(prompt)
    return prompt + c_ids, masked + c_labels, prompt + r_ids, masked + r_labels


def collate(encoded: Sequence[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, labels (2B, T): the B chosen rows, then the B rejected rows, right-padded (pad
    positions carry label −100 and, under causal attention, never affect earlier positions)."""
    rows = [(e[0], e[1]) for e in encoded] + [(e[2], e[3]) for e in encoded]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training pairs of optimizer step `step`: epochs of n // batch_size batches, each epoch
    a fresh permutation of (seed, epoch); a pure function, so a resumed run sees the same data."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[i * batch_size : (i + 1) * batch_size]


# --- config ---------------------------------------------------------------------------------------


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


RULES = (
    ("sources", lambda v: bool(v) and all(isinstance(s, str) and s for s in v), "paths/URLs"),
    ("val_fraction", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    ("eval_pairs", _positive_int, "an int > 0"),
    ("beta", lambda v: _number(v) and v > 0, "a number > 0"),
    ("lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("warmup_fraction", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("min_lr_ratio", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("epochs", _positive_int, "an int > 0"),
    ("steps", lambda v: v is None or _positive_int(v), "None or an int > 0"),
    ("batch_size", _positive_int, "an int > 0 (pairs per step)"),
    ("seq_len", lambda v: _positive_int(v) and v >= 2, "an int >= 2"),
    ("checkpoint_every", lambda v: _positive_int(v) or v == 0, "an int >= 0 (0: never)"),
    ("eval_every", _positive_int, "an int > 0"),
    ("seed", lambda v: isinstance(v, int) and 0 <= v < 2**63, "an int in [0, 2**63)"),
    ("precision", lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
)


@dataclass(frozen=True)
class DPOConfig:
    """One DPO run. Defaults: MiniCPM's stage (facts §4) with β = 0.1 (DPO paper, Zephyr)."""

    sources: tuple[str, ...] = (EMBEDDED,)  # JSONL paths/URLs/globs, or the embedded set
    val_fraction: float = 0.05  # share of prompts (by hash) held out
    eval_pairs: int = 256  # held-out pairs scored at each evaluation (the first ones)
    beta: float = 0.1  # DPO's β: strength of the pull towards the reference
    lr: float = 1e-5  # every parameter, no μP scaling (see the module docstring)
    warmup_fraction: float = 0.1  # linear warmup over this share of the steps (Zephyr: 0.1)
    min_lr_ratio: float = 0.0  # cosine floor as a share of lr; 0 as in Zephyr/TRL's cosine
    epochs: int = 1  # passes over the training pairs (MiniCPM: 1)
    steps: int | None = None  # optimizer steps; when set it replaces epochs
    batch_size: int = 8  # pairs per optimizer step (2·batch_size sequences)
    seq_len: int = 256  # tokens of prompt + response; see truncate_pair for what is cut
    max_prompt_len: int | None = None  # prompt tokens kept when cutting; None: seq_len // 2
    # MiniCPM's DPO β/ε/decay/clip are unpublished: OpenBMB's engine defaults, as in pretraining
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint_every: int = 50  # steps between resumable checkpoints in the work folder
    eval_every: int = 50  # steps between held-out evaluations and reports
    seed: int = 0  # salts the held-out split and the batch order
    precision: str = "auto"  # as TrainConfig: bf16 autocast on CUDA, fp32 on CPU

    def __post_init__(self):
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        object.__setattr__(self, "sources", tuple(self.sources))
        for name, ok, allowed in RULES:
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"DPOConfig.{name}={value!r} is not allowed; expected {allowed}")
        mpl = self.max_prompt_len
        if mpl is not None and not (_positive_int(mpl) and mpl < self.seq_len):
            raise ValueError(
                f"DPOConfig.max_prompt_len={mpl!r} is not allowed; expected None or an int in "
                f"[1, seq_len={self.seq_len}) so that every response keeps a token"
            )

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_len or self.seq_len // 2

    def total_steps(self, n_train: int) -> int:
        return self.steps or self.epochs * max(1, n_train // self.batch_size)

    def schedule(self, total_steps: int) -> ScheduleConfig:
        warmup = min(round(self.warmup_fraction * total_steps), total_steps - 1)
        return ScheduleConfig(kind="cosine", warmup_steps=warmup, min_lr_ratio=self.min_lr_ratio)


# --- the run --------------------------------------------------------------------------------------


def run_dpo(
    cfg: DPOConfig,
    init: str,
    out: str,
    *,
    work_dir: str | None = None,
    report: Report | None = None,
    device: str = "auto",
) -> dict:
    """Train the model folder `init` with DPO and write the model folder `out`; return metrics.

    An `out` that is already a complete "dpo" model folder is not trained again: its metrics are
    returned. Checkpoints go to `work_dir` (default out + ".work") every cfg.checkpoint_every
    steps; a rerun resumes from the latest and reaches the same weights. `report(metrics,
    checkpoint)` is called at every evaluation (metrics with val_* keys, step 0 included) and
    every checkpoint (the work-folder checkpoint just written, else None).
    """
    if (Path(out) / ckpt.MANIFEST_FILE).exists():
        return _finished(out)
    run = _Run(cfg, init, Path(work_dir or f"{out}.work"), report, _device(device))
    metrics = run.train()
    lineage = {
        "init": str(init),
        "init_stage": run.init_state.get("stage"),
        "init_lineage": run.init_state.get("lineage"),
        "config": to_dict(cfg),
        "pairs": {"train": len(run.train_pairs), "held_out": len(run.val_pairs)},
    }
    save_model_dir(out, run.policy, run.tok, stage="dpo", lineage=lineage, metrics=metrics)
    run.remove_checkpoints()
    return metrics


def _finished(out: str) -> dict:
    state = read_state(out)
    if state.get("stage") != "dpo":
        raise ValueError(
            f"{out}: already holds a model folder of stage {state.get('stage')!r}, not 'dpo'; "
            "choose another output folder"
        )
    return state["metrics"]


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_optimizer(model: MiniCPM, cfg: DPOConfig) -> torch.optim.AdamW:
    """AdamW with every group at the base lr (lr_scale 1, no μP), decay off on norm gains."""
    groups = param_groups(model, cfg.optimizer.weight_decay)
    for g in groups:
        g["lr_scale"], g["lr"] = 1.0, cfg.lr
    opt = cfg.optimizer
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=opt.betas, eps=opt.eps)


class _Run:
    """Models, data, optimizer and the step loop of one run; phases split to stay short."""

    def __init__(self, cfg: DPOConfig, init: str, work: Path, report: Report | None, dev):
        self.cfg, self.work, self.report, self.dev = cfg, work, report, dev
        self.amp = autocast_dtype(cfg.precision, dev)
        loaded = load_model_dir(init, device=dev)
        self.init_state = loaded.state
        self.tok = add_chat_tokens(loaded.tokenizer)
        self.policy = loaded.model
        if self.tok.vocab_size > self.policy.cfg.vocab_size:
            self.policy = resize_embeddings(self.policy, self.tok.vocab_size)
        if cfg.seq_len > self.policy.cfg.max_seq_len + 1:  # the model reads seq_len − 1 tokens
            raise ValueError(
                f"DPOConfig.seq_len={cfg.seq_len} exceeds the model's max_seq_len + 1 = "
                f"{self.policy.cfg.max_seq_len + 1}"
            )
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.policy.train()
        self._load_data()
        self.total_steps = cfg.total_steps(len(self.train_pairs))
        self.schedule = cfg.schedule(self.total_steps)
        self.opt = build_optimizer(self.policy, cfg)
        self.fingerprint = _fingerprint(cfg, init)
        self.state = {"step": 0, "window": {}, "elapsed_s": 0.0}
        self._resume()

    # --- setup ------------------------------------------------------------------------------------

    def _load_data(self) -> None:
        cfg = self.cfg
        pairs = load_pairs(cfg.sources)
        self.train_pairs, val = split_pairs(pairs, cfg.val_fraction, cfg.seed)
        self.val_pairs = val[: cfg.eval_pairs]
        if not self.train_pairs or not self.val_pairs:
            raise ValueError(
                f"{len(pairs)} pairs from {list(cfg.sources)} split into "
                f"{len(self.train_pairs)} train and {len(val)} held out (val_fraction="
                f"{cfg.val_fraction}); both must be non-empty"
            )
        self.encoded: dict[int, tuple] = {}  # train pair index -> ids, encoded when first drawn
        self.val_enc = [self._encode(p) for p in self.val_pairs]
        self.val_ref = [self._logps(self.reference, b) for b in self._val_batches()]

    def _encode(self, pair: PreferencePair) -> tuple:
        return encode_pair(self.tok, pair, self.cfg.seq_len, self.cfg.prompt_budget)

    def _train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch_rows(len(self.train_pairs), self.cfg.batch_size, self.cfg.seed, step)
        for i in rows:
            if i not in self.encoded:
                self.encoded[i] = self._encode(self.train_pairs[i])
        return collate([self.encoded[i] for i in rows], self.tok.pad_id)

    def _val_batches(self):
        size = 2 * self.cfg.batch_size  # no gradients: twice the training batch fits
        for start in range(0, len(self.val_enc), size):
            yield collate(self.val_enc[start : start + size], self.tok.pad_id)

    def _resume(self) -> None:
        latest = _latest_checkpoint(self.work)
        if latest is None:
            return
        saved = json.loads((latest / ckpt.STATE_FILE).read_text())
        if saved.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{latest}: a checkpoint of another DPO run (different config or init); "
                "remove the work folder or pass another work_dir"
            )
        self.state = ckpt.load_checkpoint(latest, self.policy, self.opt)

    # --- steps ------------------------------------------------------------------------------------

    def _logps(self, model: MiniCPM, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = (t.to(self.dev) for t in batch)
        with torch.autocast(self.dev.type, dtype=self.amp or torch.float32, enabled=bool(self.amp)):
            logps = sequence_logps(model, ids, labels)
        half = ids.shape[0] // 2
        return logps[:half], logps[half:]

    def train(self) -> dict:
        metrics: dict = {}
        if self.state["step"] == 0:
            metrics = self._emit(evaluate=True, checkpoint=False)
        while self.state["step"] < self.total_steps:
            t0 = time.perf_counter()
            self._step()
            self.state["elapsed_s"] += time.perf_counter() - t0
            step, last = self.state["step"], self.state["step"] == self.total_steps
            evaluate = last or step % self.cfg.eval_every == 0
            save = not last and self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0
            if evaluate or save:
                metrics = self._emit(evaluate, bool(save))
        return metrics

    def _step(self) -> None:
        step, cfg = self.state["step"], self.cfg
        lr = lr_at(step, self.total_steps, cfg.lr, self.schedule)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = self._train_batch(step)
        with torch.no_grad():
            ref_c, ref_r = self._logps(self.reference, batch)
        pol_c, pol_r = self._logps(self.policy, batch)
        losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta)
        losses.mean().backward()
        if cfg.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optimizer.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats = pair_stats(losses.detach(), rc, rr, pol_c.detach(), pol_r.detach())
        window = self.state["window"]
        for k, v in stats.items():
            window[k] = window.get(k, 0.0) + v
        self.state.update(step=step + 1, lr=lr)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, reward accuracy, margin and log-probs, means over the held-out pairs."""
        self.policy.eval()
        sums: dict = {}
        for batch, (ref_c, ref_r) in zip(self._val_batches(), self.val_ref, strict=True):
            pol_c, pol_r = self._logps(self.policy, batch)
            losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.cfg.beta)
            for k, v in pair_stats(losses, rc, rr, pol_c, pol_r).items():
                sums[k] = sums.get(k, 0.0) + v
        self.policy.train()
        return mean_stats(sums, "val_")

    # --- reports and checkpoints ------------------------------------------------------------------

    def _emit(self, evaluate: bool, checkpoint: bool) -> dict:
        step = self.state["step"]
        metrics = {
            "step": step,
            "total_steps": self.total_steps,
            "epoch": step * self.cfg.batch_size / len(self.train_pairs),
            "lr": self.state.get("lr", 0.0),
            "elapsed_s": self.state["elapsed_s"],
            **(mean_stats(self.state["window"], "train_") if self.state["window"] else {}),
            **(self.evaluate() if evaluate else {}),
        }
        self.state["window"] = {}
        folder = self._save() if checkpoint else None
        if self.report is not None:
            self.report(metrics, folder)
        return metrics

    def _save(self) -> Path:
        folder = self.work / f"step_{self.state['step']:08d}"
        state = {**self.state, "fingerprint": self.fingerprint}
        ckpt.save_checkpoint(folder, self.policy, self.opt, state)
        for old in self.work.glob("step_*"):  # the newest complete checkpoint is all a resume needs
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def remove_checkpoints(self) -> None:
        for old in self.work.glob("step_*"):
            shutil.rmtree(old, ignore_errors=True)
        if self.work.is_dir() and not any(self.work.iterdir()):
            self.work.rmdir()


def _latest_checkpoint(work: Path) -> Path | None:
    complete = sorted(p for p in work.glob("step_*") if (p / ckpt.MANIFEST_FILE).exists())
    return complete[-1] if complete else None


def _fingerprint(cfg: DPOConfig, init: str) -> str:
    """The config and the init weights (its manifest): what a checkpoint must have come from."""
    manifest = (Path(init) / ckpt.MANIFEST_FILE).read_text()
    return hashlib.sha256(json.dumps([to_dict(cfg), manifest]).encode()).hexdigest()

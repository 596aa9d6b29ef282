"""Scoring a causal LM on benchmark items: option likelihoods and greedy generation.

MiniCPM (arXiv 2404.06395 §4 and its UltraEval set-up) scores multiple choice two ways, by the
likelihood of each option and by generating the answer, and reports the better of the two per
model, because small models often know the answer before they follow the answer format. Here:

- `loglik`: argmax over options of sum log p(option | context);
- `loglik_norm`: the same sum divided by the option's length in UTF-8 bytes (or characters):
  lm-evaluation-harness's `acc_norm`, which stops long options being penalised for length;
- `generate`: greedy decoding, then extracting the answer (a letter, a number or the first line);
- `best`: the highest of the three, with the mode that gave it (`chosen_mode`).

Every function is deterministic: batches are ordered by length with ties broken by position,
argmax picks the first of equal scores, and greedy decoding batches only prompts of equal length,
so no padding ever reaches the model and one KV cache of `trainables.generate` serves a batch.
Any module with MiniCPM's forward, `model(ids (B, T)) -> logits (B, T, V)`, can be scored: the
float model, a GPTQ-quantised one, or a test's fake.

    lp = continuation_logprobs(model, [(ctx_ids, opt_ids), ...], batch_size=8, max_len=256)
    out = greedy_generate(model, [prompt_ids], max_new_tokens=8, eos_id=2, max_len=256)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

import torch
import torch.nn.functional as F

from trainables.generate import KVCache, cached_forward, supports_cache
from trainables.tasks import (
    LETTERS,
    GenItem,
    MCItem,
    Task,
    gen_prompt,
    loglik_request,
    mc_generate_prompt,
)

MODES = ("loglik", "loglik_norm", "generate")  # order breaks ties in `best_mode`
NORM_UNITS = ("bytes", "chars")


def model_max_len(model: torch.nn.Module) -> int:
    """The longest sequence the model takes: its config's max_seq_len."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "max_seq_len"):
        raise ValueError(f"{type(model).__name__} has no cfg.max_seq_len; pass max_len explicitly")
    return int(cfg.max_seq_len)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live (a quantised model may hold them only as buffers)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


# --- likelihood of a continuation ----------------------------------------------------------


def fit_window(context: Sequence[int], continuation: Sequence[int], max_len: int) -> list[int]:
    """context + continuation, cut from the left so the model sees at most max_len inputs.

    The continuation is always kept whole and at least one context token precedes it.
    """
    if not context or not continuation:
        raise ValueError(
            f"context ({len(context)} ids) and continuation ({len(continuation)} ids) "
            "must both be non-empty"
        )
    if len(continuation) > max_len:
        raise ValueError(f"a continuation of {len(continuation)} ids exceeds max_len={max_len}")
    seq = list(context) + list(continuation)
    return seq[-(max_len + 1) :]  # max_len inputs predict max_len targets


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, ties in input order (deterministic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    max_len: int,
) -> list[float]:
    """sum_t log p(cont_t | context, cont_<t) in nats for each (context_ids, continuation_ids).

    Sequences are right-padded: with causal attention a pad after position t cannot change the
    logits at t, so padded and unpadded scores agree.
    """
    seqs = [fit_window(ctx, cont, max_len) for ctx, cont in pairs]
    n_scored = [len(cont) for _, cont in pairs]
    out = [0.0] * len(seqs)
    device = model_device(model)
    for batch in length_batches([len(s) for s in seqs], batch_size):
        width = len(seqs[batch[0]]) - 1
        ids = torch.zeros(len(batch), width + 1, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        logits = model(ids[:, :-1].to(device))  # (B, T, V)
        for row, i in enumerate(batch):
            end = len(seqs[i]) - 1  # logits at t predict token t + 1
            targets = ids[row, end - n_scored[i] + 1 : end + 1].to(device)
            logp = F.log_softmax(logits[row, end - n_scored[i] : end].float(), dim=-1)  # (k, V)
            out[i] = float(logp.gather(-1, targets[:, None]).sum())
    return out


def length_normalised(logprob: float, text: str, unit: str = "bytes") -> float:
    """logprob per UTF-8 byte (or per character) of the option text: harness acc_norm."""
    if unit not in NORM_UNITS:
        raise ValueError(f"unit={unit!r}: allowed {NORM_UNITS}")
    size = len(text.encode("utf-8")) if unit == "bytes" else len(text)
    return logprob / max(size, 1)


def argmax(scores: Sequence[float]) -> int:
    """Index of the highest score; the first of equal scores."""
    if not scores:
        raise ValueError("argmax of no scores")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# --- greedy generation ----------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    max_len: int,
    batch_size: int = 8,
    stop: Callable[[list[int]], bool] | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation ids of each prompt, ending before eos or once `stop(ids)` holds.

    Prompts are cut from the left to leave room for max_new_tokens. Only prompts of equal
    length share a batch, so no attention mask is needed and results do not depend on the batch.
    """
    if max_new_tokens < 1 or max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} must lie in 1..max_len-1={max_len - 1}")
    room = max_len - max_new_tokens
    cut = [list(p)[-room:] for p in prompts]
    if any(not p for p in cut):
        raise ValueError("every prompt needs at least one token")
    out: list[list[int]] = [[] for _ in cut]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(cut):
        by_length.setdefault(len(p), []).append(i)
    for length in sorted(by_length):
        group = by_length[length]
        for first in range(0, len(group), batch_size):
            rows = group[first : first + batch_size]
            ids = torch.tensor([cut[i] for i in rows], dtype=torch.long)
            generated = _decode_batch(model, ids, max_new_tokens, eos_id, stop, use_cache)
            for i, gen in zip(rows, generated, strict=True):
                out[i] = gen
    return out


def _decode_batch(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    stop: Callable[[list[int]], bool] | None,
    use_cache: bool,
) -> list[list[int]]:
    """Greedy steps over one batch (B, T) of equal-length prompts.

    A model with MiniCPM's module layout decodes through trainables.generate's KV cache (the
    rows have equal lengths, so one cache holds the batch); any other recomputes the prefix.
    """
    ids = ids.to(model_device(model))
    cache = None
    if use_cache and supports_cache(model):
        cache = KVCache(len(model.layers), model.cfg.max_seq_len)
    fresh = ids  # the ids the cache has not seen
    gen: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = [False] * ids.shape[0]
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(ids)[:, -1]
        else:
            logits = cached_forward(model, fresh, cache, last_only=True)[:, -1]
        nxt = logits.float().argmax(dim=-1)  # (B,): torch takes the first maximum
        for row, token in enumerate(nxt.tolist()):
            if done[row]:
                continue
            if token == eos_id:
                done[row] = True
                continue
            gen[row].append(token)
            done[row] = stop is not None and stop(gen[row])
        if all(done):
            break
        ids, fresh = torch.cat([ids, nxt[:, None]], dim=1), nxt[:, None]
    return gen


# --- answer extraction ----------------------------------------------------------------------

_ANSWER_LETTER = re.compile(r"(?i:answer)\s*(?:is)?\s*[:：]?\s*\(?([A-Z])\b")
_LONE_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])(?:[).:,]|\s|$)")
_GSM8K_ANSWER = re.compile(r"####\s*(-?[$0-9.,]+)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_letter(text: str, n_choices: int) -> int | None:
    """The option index of "Answer: B", "(B)", "B." or a lone B in the text; None if absent.

    Only letters of the first n_choices options count, so "A" in "A cat" with 2 options does
    count while "I" in "I think" with 4 options does not.
    """
    allowed = LETTERS[:n_choices]
    for pattern in (_ANSWER_LETTER, _LONE_LETTER):
        for match in pattern.finditer(text):
            if match.group(1) in allowed:
                return allowed.index(match.group(1))
    return None


def extract_number(text: str) -> str | None:
    """GSM8K's "#### 42" answer when present, else the last number in the text (flexible)."""
    marked = _GSM8K_ANSWER.search(text)
    if marked:
        return _clean_number(marked.group(1))
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def _clean_number(raw: str) -> str:
    return raw.replace(",", "").replace("$", "").rstrip(".")


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two number strings ("42" == "42.0" == "42.00"); False if either fails."""
    if a is None or b is None:
        return False
    try:
        return Decimal(_clean_number(a)) == Decimal(_clean_number(b))
    except InvalidOperation:
        return False


def first_line(text: str) -> str:
    """The first non-blank line, stripped: the answer of a short-answer generation."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after stripping and collapsing whitespace (case kept: identifiers are cased)."""
    return prediction.split() == reference.split()


# --- per-task summary -----------------------------------------------------------------------


def best_mode(accuracies: dict[str, float]) -> tuple[str, float]:
    """The paper's rule: the highest accuracy over the scored modes; ties go to MODES order."""
    scored = [m for m in MODES if m in accuracies]
    if not scored:
        raise ValueError(f"no mode of {MODES} in {sorted(accuracies)}")
    mode = max(scored, key=lambda m: (accuracies[m], -MODES.index(m)))
    return mode, accuracies[mode]


def summarise(correct: dict[str, Sequence[bool]]) -> dict:
    """{mode: accuracy, ..., "best": acc, "chosen_mode": mode, "n": items} from per-item hits."""
    sizes = {len(v) for v in correct.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every mode needs the same non-zero number of items, got {sizes}")
    acc = {mode: sum(hits) / len(hits) for mode, hits in correct.items()}
    mode, best = best_mode(acc)
    return {**acc, "best": best, "chosen_mode": mode, "n": sizes.pop()}


# --- one task -------------------------------------------------------------------------------


def score_task(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    *,
    shots: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    max_len: int | None = None,
    norm_unit: str = "bytes",
) -> dict:
    """Accuracy of every mode on the task's scored items (the first `limit`), and the best."""
    examples, scored = task.split(shots)
    scored = scored[:limit] if limit is not None else scored
    if not scored:
        raise ValueError(f"task {task.name}: no items left to score (limit={limit})")
    max_len = max_len or model_max_len(model)
    # at least half the window stays for the prompt, whatever the task's generation budget
    max_new_tokens = min(task.max_new_tokens, max_len // 2)
    correct = {
        "generate": _generate_hits(
            model, tokenizer, task, examples, scored, batch_size, max_len, max_new_tokens
        )
    }
    if task.kind == "mc":
        correct |= _loglik_hits(model, tokenizer, examples, scored, batch_size, max_len, norm_unit)
    return summarise(correct) | {"shots": shots}


def _loglik_hits(model, tokenizer, examples, items, batch_size, max_len, norm_unit) -> dict:
    requests = [loglik_request(item, examples) for item in items]
    contexts = tokenizer.encode([ctx for ctx, _ in requests])
    options = [opt for _, opts in requests for opt in opts]
    option_ids = iter(tokenizer.encode(options))
    pairs = [
        (ctx, next(option_ids))
        for ctx, (_, opts) in zip(contexts, requests, strict=True)
        for _ in opts
    ]
    logprobs = continuation_logprobs(model, pairs, batch_size=batch_size, max_len=max_len)
    hits: dict[str, list[bool]] = {"loglik": [], "loglik_norm": []}
    first = 0
    for item in items:
        span = range(first, first + len(item.choices))
        norm = [length_normalised(logprobs[k], options[k], norm_unit) for k in span]
        hits["loglik"].append(argmax([logprobs[k] for k in span]) == item.answer)
        hits["loglik_norm"].append(argmax(norm) == item.answer)
        first += len(item.choices)
    return hits


def _generate_hits(
    model, tokenizer, task, examples, items, batch_size, max_len, max_new_tokens
) -> list[bool]:
    if task.kind == "mc":
        prompts = [mc_generate_prompt(item, examples) for item in items]
    else:
        prompts = [gen_prompt(item, examples) for item in items]

    def stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        return any(s in text for s in task.stop)

    outputs = greedy_generate(
        model,
        tokenizer.encode(prompts),
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
        max_len=max_len,
        batch_size=batch_size,
        stop=stop,
    )
    return [
        _check(task, item, tokenizer.decode(ids)) for item, ids in zip(items, outputs, strict=True)
    ]


def _check(task: Task, item: MCItem | GenItem, text: str) -> bool:
    if isinstance(item, MCItem):
        return extract_letter(text, len(item.choices)) == item.answer
    if task.checker == "number":
        return numbers_equal(extract_number(text), extract_number(item.reference))
    return exact_match(first_line(text), first_line(item.reference))

"""Benchmark task files: multiple choice and generation items from JSON Lines over fsspec.

Each line is one JSON object in one of the common public layouts, normalised on reading:

| layout          | fields                                                                     |
|-----------------|----------------------------------------------------------------------------|
| multiple choice | {"question", "choices": [...], "answer": index, letter or the right text}  |
| MMLU columns    | {"question", "A", "B", "C", "D", "answer": letter or index}                |
| HellaSwag       | {"ctx" (or "ctx_a" + "ctx_b"), "endings": [...], "label": index}           |
| ARC (HF)        | {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}      |
| ARC (original)  | {"question": {"stem", "choices": [{"text", "label"}, ...]}, "answerKey"}   |
| generation      | {"prompt" or "question", "answer" or "reference"}                          |

A generation task is checked by exact match of the first generated line, or numerically when its
references are numbers or GSM8K's "reasoning ... #### 42" (then the model may reason over lines).

A task is named by a spec: `PATH_OR_URL` or `PATH_OR_URL#dev=DEV_PATH&name=NAME&checker=number`.
Few-shot examples are the first k of a seeded shuffle of the dev file (nested: the 3 examples are
among the 5), or without a dev file the first k items of the task file; either way they are never
scored. Errors name the file, the line and the field.

    task = load_task("data/mmlu_test.jsonl.gz#dev=data/mmlu_dev.jsonl.gz")
    examples, scored = task.split(shots=5)
    context, options = loglik_request(scored[0], examples)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from urllib.parse import parse_qsl

import fsspec

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
KINDS = ("mc", "gen")
CHECKERS = {"mc": ("letter",), "gen": ("exact", "number")}
STYLES = ("qa", "completion")  # "Question: ...\nAnswer: <option>" or text that the option ends
TASK_OPTIONS = ("dev", "name", "checker")
MC_MAX_NEW_TOKENS = 4  # " B\n" and a little slack
COT_MAX_NEW_TOKENS = 256  # GSM8K-style worked answers
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".md", ".parquet")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


class TaskError(ValueError):
    """A task file or spec that cannot be read; the message names file:line and the field."""


@dataclass(frozen=True)
class MCItem:
    question: str  # the question, or for style "completion" the text the right option continues
    choices: tuple[str, ...]
    answer: int  # index into choices
    style: str = "qa"

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        if not 2 <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"MCItem.choices: {len(self.choices)} options, need 2..26")
        if not all(isinstance(c, str) for c in self.choices):
            raise ValueError(f"MCItem.choices={self.choices!r}: options must be strings")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"MCItem.answer={self.answer}: not an index of {len(self.choices)}")
        if self.style not in STYLES:
            raise ValueError(f"MCItem.style={self.style!r}: allowed {STYLES}")


@dataclass(frozen=True)
class GenItem:
    prompt: str
    reference: str


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "mc" | "gen"
    items: tuple  # MCItem or GenItem, in file order
    dev: tuple  # few-shot pool; empty: examples come from the head of `items`
    checker: str  # "letter" for mc; "exact" or "number" for gen
    max_new_tokens: int  # budget of the generate mode
    stop: tuple[str, ...]  # generation ends once its text contains one of these
    source: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task.kind={self.kind!r}: allowed {KINDS}")
        if self.checker not in CHECKERS[self.kind]:
            raise ValueError(
                f"Task.checker={self.checker!r}: a {self.kind} task allows {CHECKERS[self.kind]}"
            )
        if not self.items:
            raise ValueError(f"Task.items: task {self.name!r} ({self.source}) has no items")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"Task.max_new_tokens={self.max_new_tokens!r}: a positive integer")

    def split(self, shots: int) -> tuple[tuple, tuple]:
        """(few-shot examples, scored items); the examples are never among the scored items."""
        if not isinstance(shots, int) or shots < 0:
            raise ValueError(f"shots={shots!r}: a non-negative integer")
        if self.dev:
            if shots > len(self.dev):
                raise ValueError(f"shots={shots}: task {self.name} has {len(self.dev)} dev items")
            order = list(range(len(self.dev)))
            random.Random(self.name).shuffle(order)  # str seeds hash the same on every machine
            return tuple(self.dev[i] for i in order[:shots]), self.items
        if shots >= len(self.items):
            raise ValueError(f"shots={shots}: task {self.name} has only {len(self.items)} items")
        return self.items[:shots], self.items[shots:]

    def sha256(self) -> str:
        """Content hash of everything that decides scores, for resumable results."""
        content = {k: v for k, v in asdict(self).items() if k != "source"}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# --- prompts --------------------------------------------------------------------------------


def _joined(text: str, option: str) -> str:
    """The option as it follows text: after a space unless the text ends in whitespace."""
    return option if not text or text[-1].isspace() else " " + option


def _query(item: MCItem) -> str:
    return item.question if item.style == "completion" else f"Question: {item.question}\nAnswer:"


def loglik_request(item: MCItem, examples: tuple) -> tuple[str, list[str]]:
    """(context, continuations) for scoring each option by its likelihood."""
    shots = "".join(
        _query(ex) + _joined(_query(ex), ex.choices[ex.answer]) + "\n\n" for ex in examples
    )
    context = shots + _query(item)
    return context, [_joined(context, c) for c in item.choices]


def _lettered(item: MCItem) -> str:
    head = item.question
    if item.style == "completion":
        head = f"Which ending continues this text?\n{item.question}"
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"Question: {head}{options}\nAnswer:"


def mc_generate_prompt(item: MCItem, examples: tuple) -> str:
    """The question with lettered options; the model should answer with the right letter."""
    shots = "".join(f"{_lettered(ex)} {LETTERS[ex.answer]}\n\n" for ex in examples)
    return shots + _lettered(item)


def gen_prompt(item: GenItem, examples: tuple) -> str:
    shots = "".join(f"Question: {ex.prompt}\nAnswer: {ex.reference}\n\n" for ex in examples)
    return f"{shots}Question: {item.prompt}\nAnswer:"


# --- specs and files ------------------------------------------------------------------------


def parse_spec(spec: str, allowed: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """ "PATH#k=v&k=v" -> (PATH, {k: v}); unknown or repeated keys are refused."""
    source, _, fragment = spec.partition("#")
    if not source:
        raise TaskError(f"spec {spec!r}: no path before '#'")
    pairs = parse_qsl(fragment, keep_blank_values=True) if fragment else []
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed or key in options or not value:
            raise TaskError(
                f"spec {spec!r}: option {key!r}={value!r} is not allowed; options are "
                f"{', '.join(allowed)}, each once, as PATH#key=value&key=value"
            )
        options[key] = value
    return source, options


def default_name(source: str) -> str:
    name = PurePosixPath(source.split("://")[-1]).name
    while name.endswith(_COMPRESSION):
        name = name.rsplit(".", 1)[0]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and stem and f".{suffix}" in _DATA_SUFFIXES else name


def read_records(source: str) -> list[tuple[str, dict]]:
    """(where, record) for each non-blank line; where = "file:line"."""
    try:
        with fsspec.open(source, "rt", encoding="utf-8", compression="infer") as f:
            lines = list(f)
    except FileNotFoundError as err:
        raise TaskError(f"{source}: no such task file") from err
    except UnicodeDecodeError as err:
        raise TaskError(f"{source}: not UTF-8 text ({err.reason})") from err
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append((where, record))
    if not records:
        raise TaskError(f"{source}: no items (the file is empty)")
    return records


def load_task(spec: str) -> Task:
    """The task a spec names; the kind and checker follow from the records unless given."""
    source, options = parse_spec(spec, TASK_OPTIONS)
    items = read_items(source)
    dev = read_items(options["dev"]) if "dev" in options else ()
    kind = _single_kind(items + dev, source)
    checker = options.get("checker") or _default_checker(kind, items + dev)
    if checker not in CHECKERS[kind]:
        raise TaskError(
            f"spec {spec!r}: checker={checker!r}; a {kind} task allows {CHECKERS[kind]}"
        )
    budget, stop = _generation_budget(kind, checker, items + dev)
    name = options.get("name") or default_name(source)
    return Task(name, kind, items, dev, checker, budget, stop, source)


def read_items(source: str) -> tuple:
    return tuple(parse_record(record, where) for where, record in read_records(source))


def _single_kind(items: tuple, source: str) -> str:
    kinds = {"mc" if isinstance(i, MCItem) else "gen" for i in items}
    if len(kinds) != 1:
        raise TaskError(f"{source}: mixes multiple-choice and generation items; split the file")
    return kinds.pop()


def _default_checker(kind: str, items: tuple) -> str:
    if kind == "mc":
        return "letter"
    numeric = all("####" in i.reference or _NUMBER.fullmatch(i.reference.strip()) for i in items)
    return "number" if numeric else "exact"


def _generation_budget(kind: str, checker: str, items: tuple) -> tuple[int, tuple[str, ...]]:
    """Tokens and stop strings of the generate mode: one line, or a worked answer."""
    if kind == "mc":
        return MC_MAX_NEW_TOKENS, ("\n",)
    if any("\n" in i.reference or "####" in i.reference for i in items):
        return COT_MAX_NEW_TOKENS, ("\n\n", "Question:")
    longest = max(len(i.reference) for i in items)  # a token holds at least one character
    return min(COT_MAX_NEW_TOKENS, longest + 4), ("\n",)


# --- layouts --------------------------------------------------------------------------------


def parse_record(record: dict, where: str) -> MCItem | GenItem:
    """One JSON object in any supported layout, normalised."""
    if "endings" in record:
        return _hellaswag(record, where)
    if isinstance(record.get("question"), dict):
        return _arc_original(record, where)
    if isinstance(record.get("choices"), dict):
        return _arc(record, where)
    if "choices" in record:
        return _generic_mc(record, where)
    if "A" in record and "B" in record:
        return _mmlu(record, where)
    if "prompt" in record or "question" in record:
        return _generation(record, where)
    keys = ", ".join(sorted(record)) or "none"
    raise TaskError(
        f"{where}: unknown layout (fields: {keys}); expected question+choices+answer, MMLU "
        "A/B/C/D columns, HellaSwag ctx+endings+label, ARC question+choices+answerKey, or "
        "prompt/question+answer/reference"
    )


def _text(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise TaskError(
            f"{where}: field {field!r} is missing (fields: {', '.join(sorted(record))})"
        )
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"{where}: field {field!r}={value!r} must be a non-empty string")
    return value


def _options(value: object, field: str, where: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise TaskError(f"{where}: field {field!r}={value!r} must be a list of 2+ strings")
    if len(value) > len(LETTERS):
        raise TaskError(f"{where}: field {field!r} has {len(value)} options, at most 26")
    return value


def _answer_index(value: object, labels: list[str], choices: list[str], field: str, where: str):
    """An index from an int, a label ("B", "3"), a digit string, or the right option's text."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return value
    if isinstance(value, str):
        key = value.strip()
        if key in labels:
            return labels.index(key)
        if key.isdigit() and int(key) < len(choices):
            return int(key)
        if value in choices:
            return choices.index(value)
    raise TaskError(
        f"{where}: field {field!r}={value!r} is not an answer: give an index 0..{len(choices) - 1},"
        f" a label of {', '.join(labels)}, or the right option's text"
    )


def _generic_mc(r: dict, where: str) -> MCItem:
    choices = _options(r["choices"], "choices", where)
    field = "answer" if "answer" in r else "label"
    if field not in r:
        raise TaskError(f"{where}: field 'answer' is missing (fields: {', '.join(sorted(r))})")
    labels = list(LETTERS[: len(choices)])
    answer = _answer_index(r[field], labels, choices, field, where)
    return MCItem(_text(r, "question", where), tuple(choices), answer)


def _mmlu(r: dict, where: str) -> MCItem:
    labels = [c for c in LETTERS if c in r]
    if labels != list(LETTERS[: len(labels)]):
        raise TaskError(f"{where}: option columns {labels} must run A, B, C, ... without gaps")
    choices = _options([r[c] for c in labels], "A..", where)
    answer = _answer_index(r.get("answer"), labels, choices, "answer", where)
    return MCItem(_text(r, "question", where), tuple(choices), answer)


def _hellaswag(r: dict, where: str) -> MCItem:
    endings = _options(r["endings"], "endings", where)
    if "ctx" in r:
        ctx = _text(r, "ctx", where)
    else:
        ctx = (_text(r, "ctx_a", where) + " " + r.get("ctx_b", "")).rstrip()
    answer = _answer_index(r.get("label"), [], endings, "label", where)
    return MCItem(ctx, tuple(endings), answer, style="completion")


def _arc(r: dict, where: str) -> MCItem:
    box = r["choices"]
    texts = _options(box.get("text"), "choices.text", where)
    labels = box.get("label")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise TaskError(f"{where}: field 'choices.label'={labels!r}: one label per choices.text")
    answer = _answer_index(r.get("answerKey"), [str(x) for x in labels], texts, "answerKey", where)
    return MCItem(_text(r, "question", where), tuple(texts), answer)


def _arc_original(r: dict, where: str) -> MCItem:
    q = r["question"]
    raw = q.get("choices")
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise TaskError(f"{where}: field 'question.choices'={raw!r}: a list of {{text, label}}")
    texts = _options([c.get("text") for c in raw], "question.choices[].text", where)
    labels = [str(c.get("label")) for c in raw]
    answer = _answer_index(r.get("answerKey"), labels, texts, "answerKey", where)
    return MCItem(_text(q, "stem", where + " question"), tuple(texts), answer)


def _generation(r: dict, where: str) -> GenItem:
    prompt_field = "prompt" if "prompt" in r else "question"
    ref_field = "answer" if "answer" in r else "reference"
    if ref_field not in r:
        raise TaskError(
            f"{where}: field 'answer' is missing (a generation item needs 'answer' or "
            f"'reference'; fields: {', '.join(sorted(r))})"
        )
    ref = r[ref_field]
    if isinstance(ref, (int, float)) and not isinstance(ref, bool):
        ref = str(ref)  # numeric answers as JSON numbers
    if not isinstance(ref, str) or not ref.strip():
        raise TaskError(
            f"{where}: field {ref_field!r}={ref!r} must be a non-empty string or number"
        )
    return GenItem(_text(r, prompt_field, where), ref)

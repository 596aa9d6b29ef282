"""Preference pairs for DPO: a prompt (chat messages), a chosen and a rejected response.

`load_pairs` reads JSON Lines from local paths, globs or any fsspec URL (.jsonl, .json, and their
.gz/.bz2/.xz forms) in the layouts the public preference sets use, told apart per record:

- {"prompt": str, "chosen": str, "rejected": str}: one user turn and two responses;
- Anthropic hh-rlhf {"chosen": str, "rejected": str}: two whole "\\n\\nHuman: …\\n\\nAssistant: …"
  transcripts; the prompt is the shared prefix, each response follows the last "\\n\\nAssistant:";
- UltraFeedback-binarized {"prompt": str, "chosen": [messages], "rejected": [messages]}: the last
  message of each list is the response, the messages before it (or else the prompt) the prompt.

Errors name the file, the line and the field. `split_pairs` holds out pairs by a hash of the
prompt, so every response to one prompt lands on the same side; `epoch_order` is the training
order, a pure function of (seed, epoch).

`EMBEDDED` ("embedded:preferences") is a set built offline from the running Python's standard
library: "What does `json.dumps(obj, …)` do?", chosen = the first paragraph of its docstring,
rejected = another function's paragraph, its words shuffled, or its first half. It is cached as
JSON Lines under <SANDBOX_CACHE>/preferences/ and read like any other file.

    python -m trainables.preference_data [SOURCE ...]   # count pairs, print one
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.chat import ROLES, ChatFormatError, check_messages, parse_transcript
from trainables.corpus import EMBEDDED as STDLIB
from trainables.corpus import expand_files, is_validation, source_fingerprint, stdlib_files
from trainables.data import default_cache_dir
from trainables.tokenizer import atomic_write, file_lock

EMBEDDED = "embedded:preferences"
EMBEDDED_VERSION = 1  # bump when the construction below changes: it is part of the cache key
ASSISTANT_TAG = "\n\nAssistant:"
# Docstring paragraphs of this many characters: long enough to say something, short enough that
# prompt and response fit the micro models' 128-256 token windows.
SUMMARY_CHARS = (40, 240)


class PreferenceDataError(ValueError):
    """A record that is not a preference pair; the message names file:line and the field."""


@dataclass(frozen=True, eq=False)
class PreferencePair:
    prompt: tuple[dict[str, str], ...]  # chat messages {"role", "content"}, user turn last
    chosen: str  # the preferred assistant response
    rejected: str  # the dispreferred one
    where: str  # file:line it came from

    def prompt_key(self) -> str:
        """The prompt as canonical JSON: what the held-out split hashes."""
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


# --- reading ------------------------------------------------------------------------------------


def load_pairs(
    sources: str | Sequence[str], cache_dir: str | Path | None = None
) -> list[PreferencePair]:
    """Every pair of every source, in order; EMBEDDED is built (once) into the cache."""
    return list(iter_pairs(sources, cache_dir))


def iter_pairs(
    sources: str | Sequence[str], cache_dir: str | Path | None = None
) -> Iterator[PreferencePair]:
    items = [sources] if isinstance(sources, str) else list(sources)
    if not items:
        raise PreferenceDataError(f"no sources given; pass paths, URLs, globs or {EMBEDDED!r}")
    for source in items:
        path = str(embedded_path(cache_dir)) if source == EMBEDDED else source
        for of in expand_files(path, PreferenceDataError, "preference source"):
            yield from _file_pairs(of)


def _file_pairs(of) -> Iterator[PreferencePair]:
    with of as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{of.full_name}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PreferenceDataError(f"{where}: not UTF-8 ({err.reason})") from err
            if line.strip():
                yield pair_from_record(_json(line, where), where)


def _json(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PreferenceDataError(
            f"{where}: bad JSON ({err.msg} at column {err.colno}); expected one object per line"
        ) from err
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def pair_from_record(record: dict, where: str) -> PreferencePair:
    """One pair from a record in any of the three layouts (see the module docstring)."""
    for name in ("chosen", "rejected"):
        if name not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise PreferenceDataError(f"{where}: no field {name!r} (fields: {keys})")
    chosen = record["chosen"]
    if isinstance(chosen, list):
        return _messages_pair(record, where)
    if not isinstance(chosen, str):
        raise PreferenceDataError(
            f"{where}: field 'chosen' is {type(chosen).__name__}: expected a string (with "
            "'prompt', or an hh-rlhf transcript) or a list of messages (UltraFeedback)"
        )
    _require_type(record, "rejected", str, where)
    if "prompt" in record:
        prompt = ({"role": "user", "content": _require_type(record, "prompt", str, where)},)
        return _pair(prompt, chosen, record["rejected"], where)
    return _transcript_pair(chosen, record["rejected"], where)


def _pair(prompt: tuple[dict, ...], chosen: str, rejected: str, where: str) -> PreferencePair:
    """The pair, once both conversations fit the chat template (alternating turns, no markers)."""
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        try:
            check_messages([*prompt, {"role": "assistant", "content": response}])
        except ChatFormatError as err:
            raise PreferenceDataError(f"{where}: field {name!r}: {err}") from err
    return PreferencePair(prompt, chosen, rejected, where)


def _require_type(record: dict, field: str, kind: type, where: str):
    value = record[field]
    if not isinstance(value, kind):
        raise PreferenceDataError(
            f"{where}: field {field!r} is {type(value).__name__}, expected {kind.__name__}"
        )
    return value


def _transcript_pair(chosen: str, rejected: str, where: str) -> PreferencePair:
    """hh-rlhf: split at the last "\\n\\nAssistant:"; both transcripts must share that prefix."""
    cut = chosen.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise PreferenceDataError(
            f"{where}: field 'chosen' has no {ASSISTANT_TAG!r} turn; without 'prompt' it must be "
            "an hh-rlhf transcript"
        )
    prefix = chosen[: cut + len(ASSISTANT_TAG)]
    if not rejected.startswith(prefix):
        raise PreferenceDataError(
            f"{where}: field 'rejected' does not start with the prompt of 'chosen' (the "
            f"transcript up to its last {ASSISTANT_TAG!r}); both must share it"
        )
    try:
        prompt = tuple(parse_transcript(prefix)[:-1])  # the prefix ends in an empty assistant turn
    except ChatFormatError as err:
        raise PreferenceDataError(f"{where}: field 'chosen': {err}") from err
    # stripped as parse_transcript strips every turn
    return _pair(prompt, chosen[len(prefix) :].strip(), rejected[len(prefix) :].strip(), where)


def _messages_pair(record: dict, where: str) -> PreferencePair:
    """UltraFeedback-binarized: message lists that differ only in their last (assistant) turn."""
    chosen = _messages(record["chosen"], "chosen", where)
    rejected = _messages(_require_type(record, "rejected", list, where), "rejected", where)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise PreferenceDataError(
                f"{where}: field {name!r} must end with an assistant message (the response)"
            )
    if chosen[:-1] != rejected[:-1]:
        raise PreferenceDataError(
            f"{where}: fields 'chosen' and 'rejected' differ before their last message; "
            "they must share the prompt"
        )
    prompt = tuple(chosen[:-1])
    if not prompt:
        text = _require_type(record, "prompt", str, where) if "prompt" in record else None
        if text is None:
            raise PreferenceDataError(f"{where}: no prompt: neither field 'prompt' nor messages")
        prompt = ({"role": "user", "content": text},)
    return _pair(prompt, chosen[-1]["content"], rejected[-1]["content"], where)


def _messages(value: list, field: str, where: str) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise PreferenceDataError(f"{where}: field {name!r} is not a message object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PreferenceDataError(
                f"{where}: field '{name}.role' is {role!r}, expected one of {ROLES}"
            )
        if not isinstance(content, str):
            raise PreferenceDataError(
                f"{where}: field '{name}.content' is {type(content).__name__}, expected str"
            )
        out.append({"role": role, "content": content})
    return out


# --- split and order ----------------------------------------------------------------------------


def split_pairs(
    pairs: Iterable[PreferencePair], val_fraction: float, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) by a hash of the prompt; order kept, stable on any machine."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in [0, 1)")
    train: list[PreferencePair] = []
    val: list[PreferencePair] = []
    for pair in pairs:
        (val if is_validation(pair.prompt_key(), val_fraction, seed) else train).append(pair)
    return train, val


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


# --- the embedded set ---------------------------------------------------------------------------


def embedded_path(cache_dir: str | Path | None = None, max_pairs: int = 4000) -> Path:
    """The cached JSONL of the embedded set, built on first use (under a file lock)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parts = [EMBEDDED_VERSION, max_pairs, source_fingerprint([STDLIB])]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    path = cache / "preferences" / f"{key}.jsonl"
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in embedded_records(max_pairs))
            atomic_write(path, "".join(lines).encode("utf-8"))
    return path


def embedded_records(max_pairs: int) -> list[dict[str, str]]:
    """Up to `max_pairs` records {"prompt", "chosen", "rejected", "rejected_kind"}, deterministic.

    Functions are taken in order of a hash of their name, so the set is a spread over the whole
    library; the rejected response cycles through three kinds of worse answer.
    """
    functions = sorted(documented_functions(), key=lambda f: _digest(f[0]))[:max_pairs]
    records = []
    for i, (signature, summary) in enumerate(functions):
        kind = ("other", "shuffled", "truncated")[i % 3]
        if kind == "other":  # a real docstring, but of the next function in hash order
            rejected = functions[(i + 1) % len(functions)][1]
        elif kind == "shuffled":
            rejected = _shuffled(summary, _digest(signature))
        else:
            words = summary.split()
            rejected = " ".join(words[: len(words) // 2])
        prompt = f"What does the Python function `{signature}` do?"
        records.append(
            {"prompt": prompt, "chosen": summary, "rejected": rejected, "rejected_kind": kind}
        )
    return records


def documented_functions() -> list[tuple[str, str]]:
    """(signature, first docstring paragraph) of the stdlib's public functions and methods.

    A paragraph already seen is skipped, so no two functions share the chosen answer.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found, seen = [], set()
    for path in stdlib_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for signature, summary in _file_functions(path, module):
            if summary not in seen:
                seen.add(summary)
                found.append((signature, summary))
    return found


def _file_functions(path: Path, module: str) -> Iterator[tuple[str, str]]:
    with tokenize.open(path) as f:  # honours PEP 263 coding cookies
        try:
            body = ast.parse(f.read()).body
        except SyntaxError:  # lib2to3 test data and the like
            return
    for node in body:
        defs = node.body if isinstance(node, ast.ClassDef) else [node]
        owner = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
        for fn in defs:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name[0] == "_":
                continue
            summary = " ".join((ast.get_docstring(fn) or "").split("\n\n")[0].split())
            if SUMMARY_CHARS[0] <= len(summary) <= SUMMARY_CHARS[1]:
                yield f"{module}.{owner}{fn.name}({_arguments(fn.args)})", summary


def _arguments(args: ast.arguments) -> str:
    names = [a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
    names += [f"*{args.vararg.arg}"] if args.vararg else []
    names += [a.arg for a in args.kwonlyargs]
    return ", ".join(names + ([f"**{args.kwarg.arg}"] if args.kwarg else []))


def _shuffled(text: str, seed: int) -> str:
    words = text.split()
    order = words[:]
    random.Random(seed).shuffle(order)
    if order == words:  # a shuffle that changed nothing would make chosen == rejected
        order = words[1:] + words[:1]
    return " ".join(order)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def main(argv: Sequence[str] | None = None) -> None:
    sources = list(argv if argv is not None else sys.argv[1:]) or [EMBEDDED]
    pairs = load_pairs(sources)
    train, val = split_pairs(pairs, 0.05)
    print(f"{len(pairs)} pairs ({len(train)} train, {len(val)} held out at 5%)")
    if pairs:
        print(json.dumps(pairs[0].__dict__, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

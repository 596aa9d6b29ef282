"""Default evaluation data, built offline and deterministically from the running Python's stdlib.

Tasks (JSON Lines in the generic layouts of `trainables.tasks`, a test and a few-shot dev file):

| name                   | what                                                                  |
|------------------------|-----------------------------------------------------------------------|
| embedded:stdlib-mc     | which standard-library module defines the public function `X`? (4)    |
| embedded:docstring-mc  | which function has this docstring (its first line)? (4 names)         |
| embedded:arith-gen     | "What is 17 + 25?" -> 42, generated and checked as a number           |
| embedded:cloze-mc      | held-out source: the true next line vs 3 lines of other held-out      |
|                        | files at the same indentation, so the indentation gives nothing away  |

Held-out set `embedded:stdlib-val`: the validation split of the default pretraining data
(`DataConfig()`), i.e. text a model trained on the default corpus has not seen. The cloze task
is cut from the same split; the two knowledge tasks ask about the whole library, as MMLU asks
about what pretraining read.

Files are built once per Python build under <SANDBOX_CACHE>/eval/<key>/ (key = hash of this
builder's version, the Python version and the stdlib's files), each written atomically, dev
before test, so a test file that exists is complete. Choices and items are drawn from seeded
`random.Random(str)` generators, which give the same draws on every machine.

    spec = task_spec("embedded:stdlib-mc")     # "<cache>/...test.jsonl#dev=...&name=..."
    python -m trainables.eval_data             # build everything, print the sizes
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

from trainables.corpus import (
    EMBEDDED,
    embedded_corpus_docs,
    is_validation,
    source_fingerprint,
    stdlib_files,
)
from trainables.data import DataConfig, default_cache_dir
from trainables.tokenizer import atomic_write, file_lock

BUILD_VERSION = 1
N_TEST, N_DEV, N_OPTIONS = 200, 16, 4
HELDOUT = "embedded:stdlib-val"
SHARED_MAX_CHARS = 100_000  # a shared corpus as a default set: a sample, not the whole file
CLOZE_CONTEXT_LINES = 8
CLOZE_LINES_PER_FILE = 3
Def = tuple[str, str, str]  # (module, function name, first docstring line or "")


# --- where the files live -------------------------------------------------------------------


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = json.dumps([BUILD_VERSION, sys.version, source_fingerprint(EMBEDDED)])
    return cache / "eval" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    return name.removeprefix("embedded:")


class Sources:
    """The standard library read at most once per build, and only the parts a build needs."""

    @cached_property
    def definitions(self) -> list[Def]:
        return stdlib_definitions()

    @cached_property
    def validation(self) -> list[str]:
        return validation_docs()


def task_spec(
    name: str, cache_dir: str | Path | None = None, sources: Sources | None = None
) -> str:
    """The `trainables.tasks` spec of an embedded task, building its files on first use."""
    if name not in TASKS:
        raise ValueError(f"unknown embedded task {name!r}; known: {', '.join(TASKS)}")
    folder = cache_folder(cache_dir)
    test, dev = folder / f"{_slug(name)}.test.jsonl", folder / f"{_slug(name)}.dev.jsonl"
    if not test.exists():
        with file_lock(folder / f"{_slug(name)}.lock"):
            if not test.exists():
                records = TASKS[name](sources or Sources())
                _write_jsonl(dev, records[:N_DEV])
                _write_jsonl(test, records[N_DEV : N_DEV + N_TEST])
    return f"{test}#dev={dev}&name={name}"


def heldout_spec(cache_dir: str | Path | None = None, sources: Sources | None = None) -> str:
    """The `trainables.heldout` spec of the default corpus' validation documents."""
    path = cache_folder(cache_dir) / f"{_slug(HELDOUT)}.jsonl"
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):
            if not path.exists():
                docs = (sources or Sources()).validation
                _write_jsonl(path, [{"text": d} for d in docs])
    return f"{path}#name={HELDOUT}"


def resolve(
    tasks: list[str], heldout: list[str], cache_dir: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """Embedded names become file specs (built on first use, the stdlib read once); others stay."""
    sources = Sources()
    task_specs = [
        task_spec(t, cache_dir, sources) if t.startswith("embedded:") else t for t in tasks
    ]
    heldout_specs = [heldout_spec(cache_dir, sources) if h == HELDOUT else h for h in heldout]
    return task_specs, heldout_specs


def default_tasks() -> list[str]:
    return list(TASKS)


def default_heldout(shared_dir: str | Path | None = None) -> list[str]:
    """`embedded:stdlib-val`, plus a sample of each corpus in the shared data folder if present.

    The folder is `shared_dir`, else $SANDBOX_SHARED_DATA, else `shared/data` beside the
    repository; without one the default is the embedded set alone.
    """
    folder = Path(shared_dir or os.environ.get("SANDBOX_SHARED_DATA") or _repo_shared_data())
    specs = [HELDOUT]
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix in (".txt", ".jsonl", ".parquet"):
                specs.append(f"{path}#name={path.stem}&max_chars={SHARED_MAX_CHARS}")
    return specs


def _repo_shared_data() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lines.encode("utf-8"))


# --- the standard library as facts ----------------------------------------------------------


def _rank(key: str) -> bytes:
    """A machine-independent pseudo-random order: sort by the hash of a stable key."""
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stdlib_definitions() -> list[Def]:
    """(module, name, first docstring line) of every public top-level function of public modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Def] = []
    for path in stdlib_files():
        module = module_name(path, root)
        if not module or any(p.startswith("_") for p in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            public = not getattr(node, "name", "_").startswith("_")
            if public and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
                found.append((module, node.name, doc))
    return found


def _mc_record(question: str, right: str, wrong: list[str], key: str) -> dict:
    """A generic multiple-choice record with the right option at a seeded position."""
    rng = random.Random(key)
    choices = list(wrong)
    answer = rng.randrange(len(wrong) + 1)
    choices.insert(answer, right)
    return {"question": question, "choices": choices, "answer": answer}


def build_stdlib_mc(sources: Sources) -> list[dict]:
    defs = sources.definitions
    modules_of: dict[str, set[str]] = {}
    for module, name, _ in defs:
        modules_of.setdefault(name, set()).add(module)
    modules = sorted({m for m, _, _ in defs})
    unique = sorted(
        {(next(iter(ms)), n) for n, ms in modules_of.items() if len(ms) == 1 and len(n) >= 4},
        key=lambda mn: _rank(f"stdlib-mc:{mn[0]}.{mn[1]}"),
    )
    records = []
    for module, name in unique[: N_DEV + N_TEST]:
        key = f"stdlib-mc:{module}.{name}"
        wrong = random.Random(key).sample([m for m in modules if m != module], N_OPTIONS - 1)
        question = f"Which module of the Python standard library defines the function {name}()?"
        records.append(_mc_record(question, module, wrong, key))
    return records


def build_docstring_mc(sources: Sources) -> list[dict]:
    defs = sources.definitions
    names, docs = Counter(n for _, n, _ in defs), Counter(d for _, _, d in defs)
    pool = sorted(
        {
            (n, d)
            for _, n, d in defs
            if 20 <= len(d) <= 160 and names[n] == 1 and docs[d] == 1
            if n.lower() not in d.lower()  # a docstring that names its function gives it away
        },
        key=lambda nd: _rank(f"docstring-mc:{nd[0]}"),
    )
    candidates = sorted(n for n, _ in pool)
    records = []
    for name, doc in pool[: N_DEV + N_TEST]:
        key = f"docstring-mc:{name}"
        wrong = random.Random(key).sample([c for c in candidates if c != name], N_OPTIONS - 1)
        question = f'Which standard-library function has the docstring "{doc}"?'
        records.append(_mc_record(question, name, wrong, key))
    return records


def build_arith_gen(sources: Sources) -> list[dict]:
    rng = random.Random("arith-gen")
    records, seen = [], set()
    while len(records) < N_DEV + N_TEST:
        op = rng.choice("+-*")
        a, b = (
            (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else rng.sample(range(2, 99), 2)
        )
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        records.append({"question": f"What is {a} {op} {b}?", "answer": str(answer)})
    return records


# --- held-out source as a cloze -------------------------------------------------------------


def validation_docs() -> list[str]:
    """The held-out split of the default pretraining data (same rule and seed as DataConfig)."""
    cfg = DataConfig()
    return [d for d in embedded_corpus_docs() if is_validation(d, cfg.val_fraction, cfg.seed)]


def _cloze_line(line: str) -> bool:
    text = line.strip()
    return 16 <= len(text) <= 100 and not text.startswith("#") and any(c.isalpha() for c in text)


def build_cloze_mc(sources: Sources) -> list[dict]:
    docs = sources.validation
    by_indent: dict[str, list[tuple[int, str]]] = {}
    positions = []
    for d, doc in enumerate(docs):
        lines = doc.split("\n")
        for line in lines:
            if _cloze_line(line):
                by_indent.setdefault(line[: len(line) - len(line.lstrip())], []).append((d, line))
        usable = [i for i in range(CLOZE_CONTEXT_LINES, len(lines)) if _cloze_line(lines[i])]
        usable.sort(key=lambda i, d=d: _rank(f"cloze:{d}:{i}"))
        positions += [(d, i) for i in usable[:CLOZE_LINES_PER_FILE]]
    positions.sort(key=lambda di: _rank(f"cloze:{di[0]}:{di[1]}"))
    records = []
    for d, i in positions:
        lines = docs[d].split("\n")
        right = lines[i]
        indent = right[: len(right) - len(right.lstrip())]
        others = sorted({t for e, t in by_indent[indent] if e != d and t.strip() != right.strip()})
        if len(others) < N_OPTIONS - 1:
            continue
        key = f"cloze:{d}:{i}"
        wrong = random.Random(key).sample(others, N_OPTIONS - 1)
        context = "\n".join(lines[i - CLOZE_CONTEXT_LINES : i]) + "\n"
        mc = _mc_record(context, right, wrong, key)
        records.append({"ctx": context, "endings": mc["choices"], "label": mc["answer"]})
        if len(records) == N_DEV + N_TEST:
            break
    return records


TASKS: dict[str, Callable[[Sources], list[dict]]] = {
    "embedded:stdlib-mc": build_stdlib_mc,
    "embedded:docstring-mc": build_docstring_mc,
    "embedded:arith-gen": build_arith_gen,
    "embedded:cloze-mc": build_cloze_mc,
}


def main() -> None:
    tasks, heldout = resolve(list(TASKS), [HELDOUT])
    for name, spec in zip(TASKS, tasks, strict=True):
        test = Path(spec.split("#")[0])
        print(f"{name}: {sum(1 for _ in test.open())} test items -> {test}")
    print(f"{HELDOUT}: {heldout[0]}")


if __name__ == "__main__":
    main()

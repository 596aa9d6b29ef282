"""Fuzzing the spec loader: whatever the input, a StudySpec or a SpecError, and quickly.

Three sources of input: arbitrary JSON-like trees (whose keys are often real field names, so the
fuzzer gets past the top level), mutations of two valid specs (a leaf replaced, a key deleted,
an unknown key added), and text for the YAML reader (random, YAML-flavoured, and mutations of a
valid file). Derandomized so that every run tries the same 500 examples (100 + 80 + 120 trees,
60 + 80 + 60 texts).
"""

from __future__ import annotations

import copy
import time

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox_service import yaml_safe
from sandbox_service.spec import SpecError, StudySpec, parse_spec

SOURCE = "fuzz.yaml"
SECONDS = 10.0  # per example, on a busy 2-core machine; a valid spec parses in milliseconds

GRID = {
    "name": "fuzz",
    "question": "q",
    "model": {"preset": "micro-32", "scale_emb": 12.0},
    "data": {"sources": ["embedded:python-stdlib"], "vocab_size": 512, "max_chars": 10000},
    "train": {
        "tokens": 4096,
        "batch_size": 2,
        "seq_len": 16,
        "lr": 0.01,
        "schedule": {"kind": "wsd", "warmup_steps": 2, "decay_fraction": 0.1},
        "optimizer": {"betas": [0.9, 0.95], "weight_decay": 0.1},
        "save_steps": [4, 8],
    },
    "search": {
        "algorithm": "grid",
        "space": {"train.lr": {"grid": [0.01, 0.02]}, "model.preset": {"grid": ["micro-32"]}},
        "scheduler": {"kind": "asha", "grace_fraction": 0.2},
    },
    "resources": {"cpu": 1, "gpu": 0},
    "tracking": {"wandb": {"project": "fuzz", "mode": "disabled"}},
}
HYPEROPT = {
    **copy.deepcopy(GRID),
    "search": {
        "algorithm": "hyperopt",
        "num_samples": 4,
        "space": {
            "train.lr": {"loguniform": [1e-3, 1e-1]},
            "model.scale_emb": {"quniform": [1, 20, 1]},
            "train.seed": {"randint": [0, 10]},
        },
    },
    "branching": {"steps": [4, 8], "decay_fractions": [0.1, 0.2], "decay_shapes": ["exp"]},
}
BASES = (GRID, HYPEROPT)


def _names(tree) -> set[str]:
    out: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            out |= {k} | _names(v)
    return out


FIELD_NAMES = sorted(_names(GRID) | _names(HYPEROPT))
keys = st.one_of(
    st.sampled_from(FIELD_NAMES),
    st.text(max_size=12),
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and ±inf included
    st.text(max_size=20),
    st.sampled_from(["micro-32", "micro-64", "grid", "wsd", "train.lr", "..", "a/b", "1e30"]),
)
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)


def parse_or_refuse(raw) -> None:
    """The property: parse_spec returns a StudySpec or raises SpecError, in bounded time."""
    start = time.perf_counter()
    try:
        spec = parse_spec(raw, SOURCE)
    except SpecError as e:
        assert str(e).startswith(f"{SOURCE}: "), str(e)
    else:
        assert isinstance(spec, StudySpec)
    assert time.perf_counter() - start < SECONDS


FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(trees)
def test_arbitrary_trees_parse_or_raise_spec_error(raw):
    parse_or_refuse(raw)


@settings(FUZZ, max_examples=80)
@given(st.dictionaries(st.sampled_from(sorted(GRID) + ["branching", "analysis"]), trees))
def test_arbitrary_sections_parse_or_raise_spec_error(raw):
    parse_or_refuse(raw)


def _paths(tree, prefix=()) -> list[tuple]:
    """Every key path and list index path in a tree, parents before children."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        out.append((*prefix, k))
        if isinstance(v, (dict, list)) and v:
            out += _paths(v, (*prefix, k))
    return out


def _parent(tree, path):
    for k in path[:-1]:
        tree = tree[k]
    return tree


@st.composite
def mutated_specs(draw):
    """A valid spec with one to three mutations: a leaf replaced, a key deleted, a key added."""
    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(raw)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(raw, path)
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(trees)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(trees)
        else:
            parent.append(draw(trees))
    return raw


@settings(FUZZ, max_examples=120)
@given(mutated_specs())
def test_mutated_specs_parse_or_raise_spec_error(raw):
    parse_or_refuse(raw)


def test_the_fuzzed_bases_are_valid():
    """The mutations start from valid specs, so what the fuzzer sees refused is its doing."""
    for base in BASES:
        assert isinstance(parse_spec(copy.deepcopy(base), SOURCE), StudySpec)


YAML_CHARS = list("{}[]:,-&*!|>'\"#%@`?\\ \t\n") + list("ab01.e")
YAML_TOKENS = YAML_CHARS + ["<<: ", "---", "&a ", "*a", "? ", "!!int ", "!!float ", "!!set "]
YAML_TOKENS += ["!!binary ", "!!timestamp ", "!!bool ", "!!map ", "!!omap ", "!<tag:x> "]
YAML_TOKENS += ["!!python/name:os.system", "2024-13-45", "1e999", "0o9", "\ufeff", "\u2028"]
BASE_TEXT = yaml.safe_dump(GRID, sort_keys=False)


def load_or_refuse(text: str) -> None:
    start = time.perf_counter()
    try:
        yaml_safe.loads(text, SOURCE)
    except yaml_safe.YamlError as e:
        assert str(e).startswith(f"{SOURCE}: "), str(e)
    assert time.perf_counter() - start < SECONDS


@settings(FUZZ, max_examples=60)
@given(st.text(max_size=200))
def test_random_text_loads_or_raises_yaml_error(text):
    load_or_refuse(text)


@settings(FUZZ, max_examples=80)
@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=80).map("".join))
def test_yaml_flavoured_text_loads_or_raises_yaml_error(text):
    load_or_refuse(text)


@settings(FUZZ, max_examples=60)
@given(st.data())
def test_mutated_yaml_file_loads_or_raises_yaml_error(data):
    """A valid file with a few characters inserted, deleted or replaced; whatever loads must
    then parse to a StudySpec or a SpecError."""
    text = BASE_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        insert = data.draw(st.sampled_from(YAML_TOKENS) | st.text(max_size=3))
        cut = data.draw(st.integers(0, 3))
        text = text[:at] + insert + text[at + cut :]
    load_or_refuse(text)
    try:
        raw = yaml_safe.loads(text, SOURCE)
    except yaml_safe.YamlError:
        return
    parse_or_refuse(raw)

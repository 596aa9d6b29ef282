"""Malformed and hostile search-space files: `sandbox run` refuses each one before anything starts.

Every input of the sweep goes through the real command line (`sandbox run FILE --storage DIR`):
it must exit with status 2, print one error that names the file and the offending key (or line),
write nothing under the storage root, and never reach `run_study` (so no Ray starts). The inputs
are mutations of one valid spec, one key path at a time, plus raw texts and bytes for what a
mapping cannot express (syntax errors, aliases, encodings, sizes).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from sandbox_service import cli, yaml_safe
from sandbox_service.spec import SpecError, load_spec

DROP = object()  # a mutation value meaning "delete this key"

BASE = {
    "name": "bad-input",
    "question": "Is every bad file refused?",
    "model": {"preset": "micro-32"},
    "data": {"sources": ["embedded:python-stdlib"], "vocab_size": 512, "max_chars": 10000},
    "train": {
        "tokens": 4096,
        "batch_size": 2,
        "seq_len": 16,
        "lr": 0.01,
        "schedule": {"kind": "wsd", "warmup_steps": 2},
        "optimizer": {"weight_decay": 0.1},
    },
    "search": {
        "algorithm": "grid",
        "space": {"train.lr": {"grid": [0.01, 0.02]}},
        "scheduler": {"kind": "asha"},
    },
    "resources": {"cpu": 1, "gpu": 0},
    "tracking": {"wandb": {"project": "sandbox-tests", "mode": "disabled"}},
}
BRANCHING = {"steps": [4, 8], "decay_fractions": [0.1], "decay_shapes": ["exp"]}
ANALYSIS = {"kind": "lr_transfer", "width_key": "model.preset", "lr_key": "train.lr"}


def mutate(*changes: tuple[str, object]) -> dict:
    """BASE with each dotted path set to its value (DROP deletes it); a path into a search-space
    key is written `search.space|train.lr` so that the key's own dot is kept."""
    raw = copy.deepcopy(BASE)
    for path, value in changes:
        head, _, space_key = path.partition("|")
        keys = head.split(".") + ([space_key] if space_key else [])
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is DROP:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return raw


def dump(raw) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


# --- the sweep: (id, file content, fragments the error must contain) -------------------------

CASES: list[tuple[str, str | bytes, tuple[str, ...]]] = []


def case(ident: str, content, *fragments: str) -> None:
    CASES.append(
        (ident, content if isinstance(content, (str, bytes)) else dump(content), fragments)
    )


def bad(path: str, value, *fragments: str) -> None:
    """One mutation of BASE; the error must name `fragments` (default: the key's last part)."""
    leaf = path.replace("|", ".").rsplit(".", 1)[-1]
    case(f"{path}={value!r}"[:80], mutate((path, value)), *(fragments or (leaf,)))


# YAML syntax: the error names the line.
SYNTAX = {
    "unclosed-flow-mapping": "name: a\nmodel: {preset: micro-32\ntrain: {}\n",
    "unclosed-flow-sequence": "name: a\ndata: {sources: [a, b}\n",
    "unclosed-quote": 'name: "abc\nquestion: q\n',
    "bad-indentation": "name: a\nmodel:\n  preset: micro-32\n bad: 1\n",
    "tab-indentation": "name: a\nmodel:\n\tpreset: micro-32\n",
    "mapping-in-scalar": "name: a: b\n",
    "stray-bracket": "name: a\n]\n",
    "reserved-indicator": "name: @a\n",
    "sequence-then-mapping": "- a\nname: b\n",
    "two-documents": "name: a\n---\nname: b\n",
    "undefined-alias": "name: *nowhere\n",
    "unknown-directive-version": "%YAML 9.9\n---\nname: a\n",
    "unsafe-python-tag": "name: !!python/object/apply:os.system [echo hi]\n",
    "unsafe-python-name": "name: !!python/name:os.system\n",
    "unknown-tag": "name: !custom a\n",
}
for ident, text in SYNTAX.items():
    case(f"syntax:{ident}", text, "line")
case("control-character", "name: a\x07b\n", "unacceptable character #x0007")
case("nul-byte", "name: a\x00b\n", "unacceptable character #x0000")

# Values PyYAML's constructors choke on, keys that cannot be keys, and duplicates.
case("date-out-of-range", "name: 2024-13-45\n", "line 1", "2024-13-45")
case("bad-timestamp-tag", "name: !!timestamp 2024-01-01x\n", "line 1")
case("binary-for-string", "name: !!binary '%%%'\n", "name: expected a string")
case("int-tag-on-text", "name: !!int abc\n", "line 1")
case("float-tag-on-text", "train: {lr: !!float fast}\n", "line 1")
case("int-of-5000-digits", "train:\n  tokens: " + "9" * 5000 + "\n", "line 2")
case("sequence-as-key", "? [a, b]\n: 1\n", "line 1", "key must be a scalar")
case("mapping-as-key", "train:\n  {lr: 1}: 2\n", "line 2", "key must be a scalar")
case("set-with-list-key", "name: !!set {[1]: null}\n", "key must be a scalar")
case("set-as-key", "? !!set {a: null}\n: 1\n", "line 1", "key must be a scalar")
case("set-tag-on-sequence", "name: !!set [a, b]\n", "expected a mapping node")
case("map-tag-on-sequence", "train: !!map [lr]\n", "expected a mapping node")
case("bool-tag-on-text", "tracking:\n  wandb: {mode: !!bool maybe}\n", "line 2", "maybe")
case("int-tag-on-nothing", "train:\n  tokens: !!int\n", "line 2")
case("verbatim-int-tag-on-nothing", "train: {tokens: !<tag:yaml.org,2002:int> ''}\n", "line 1")
case("duplicate-top-key", dump(BASE) + "name: again\n", "duplicate key 'name'")
case("duplicate-nested-key", "train:\n  lr: 0.1\n  lr: 0.2\n", "line 3", "duplicate key 'lr'")
case("duplicate-flow-key", "model: {preset: micro-32, preset: micro-64}\n", "duplicate key")
case("duplicate-int-and-float-key", "search:\n  space:\n    1: a\n    1.0: b\n", "duplicate key")
case(
    "duplicate-search-key",
    "search:\n  space:\n    train.lr: {grid: [1]}\n    train.lr: {grid: [2]}\n",
    "duplicate key 'train.lr'",
)

# Aliases: bombs, cycles, and depth by nesting or by aliasing.
BOMB = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]"
    for i in range(1, 9)
]
case("billion-laughs", "\n".join(BOMB) + "\n", "alias bomb")
case("wide-alias-bomb", "a: &a [" + "x, " * 999 + "x]\nb: [" + "*a, " * 200 + "*a]\n", "alias bomb")
case("recursive-sequence-alias", "name: &a [*a]\n", "refers to itself")
case("recursive-mapping-alias", "train: &t {lr: 1, again: *t}\n", "refers to itself")
case("nested-1000-deep", "name: " + "[" * 1000 + "]" * 1000 + "\n", "levels deep")
case("nested-100-deep", "name: " + "[" * 100 + "]" * 100 + "\n", "levels deep")
CHAIN = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 80)]
case("deep-by-aliases", "\n".join(CHAIN) + "\n", "levels deep")

# Size and encoding: read no more than the cap, and only UTF-8.
case("sixteen-megabytes-of-spaces", " " * (16 << 20) + "name: a\n", "larger than")
case("two-megabytes", dump(BASE) + "#" + "x" * (2 << 20) + "\n", "larger than")
case("latin-1", dump(BASE).replace("bad-input", "caf\xe9").encode("latin-1"), "UTF-8")
case("utf-16", dump(BASE).encode("utf-16"), "UTF-8")
case("random-bytes", bytes(range(256)) * 4, "UTF-8")

# Top levels that are not a mapping, and empty files.
for ident, text in {
    "list": "- name\n- question\n",
    "scalar": "just a string\n",
    "number": "42\n",
    "empty": "",
    "comment-only": "# nothing here\n",
    "null": "null\n",
}.items():
    case(f"top:{ident}", text, "name" if ident in ("empty", "comment-only", "null") else "mapping")

# Wrong types at every level: strings for numbers, lists for mappings, booleans for ints.
WRONG_TYPES = [
    ("name", 5),
    ("name", ["a"]),
    ("question", {"a": 1}),
    ("model", "micro-32"),
    ("model", ["micro-32"]),
    ("train", [1, 2]),
    ("data", "embedded:python-stdlib"),
    ("search", ["grid"]),
    ("resources", "big"),
    ("tracking", ["wandb"]),
    ("tracking.wandb", "online"),
    ("branching", [4, 8]),
    ("analysis", ["lr_transfer"]),
    ("model.d_model", "64"),
    ("model.n_layers", True),
    ("model.n_heads", 2.5),
    ("model.scale_emb", "twelve"),
    ("model.init_std", [0.1]),
    ("model.parametrization", 1),
    ("model.width_scaled_embedding_init", "yes"),
    ("train.lr", "fast"),
    ("train.lr", True),
    ("train.lr", [0.01]),
    ("train.batch_size", "8"),
    ("train.batch_size", True),
    ("train.batch_size", 2.5),
    ("train.seq_len", [16]),
    ("train.tokens", "4096"),
    ("train.tokens", {"n": 4096}),
    ("train.eval_every", False),
    ("train.precision", 16),
    ("train.save_steps", 5),
    ("train.save_steps", ["5"]),
    ("train.init_from", 5),
    ("train.schedule", "wsd"),
    ("train.schedule", ["wsd"]),
    ("train.schedule.kind", 3),
    ("train.schedule.warmup_steps", "2"),
    ("train.schedule.warmup_steps", True),
    ("train.optimizer", [0.9, 0.95]),
    ("train.optimizer.betas", 0.9),
    ("train.optimizer.betas", [0.9]),
    ("train.optimizer.betas", ["a", "b"]),
    ("train.optimizer.eps", "small"),
    ("data.sources", "corpus.txt"),
    ("data.sources", [1, 2]),
    ("data.vocab_size", "512"),
    ("data.vocab_size", True),
    ("data.val_fraction", "0.1"),
    ("data.max_chars", True),
    ("data.format", 5),
    ("search.algorithm", 5),
    ("search.space", ["train.lr"]),
    ("search.space|train.lr", [0.01, 0.02]),
    ("search.space|train.lr", {"grid": 0.01}),
    ("search.space|train.lr", "grid"),
    ("search.num_samples", "4"),
    ("search.max_concurrent", True),
    ("search.seed", 1.5),
    ("search.metric", 5),
    ("search.mode", ["min"]),
    ("search.scheduler", "asha"),
    ("search.scheduler.grace_fraction", "x"),
    ("search.scheduler.brackets", True),
    ("resources.cpu", "1"),
    ("resources.gpu", True),
    ("tracking.wandb.project", 5),
    ("tracking.wandb.mode", True),
    ("branching.steps", 4),
    ("branching.steps", ["4"]),
    ("branching.cosine_baselines", "yes"),
    ("analysis.kind", 5),
]
for path, value in WRONG_TYPES:
    bad(path, value)
# The preset's errors name the model section but not the key (trial.model_config).
for value in (32, ["micro-32"], {"name": "micro-32"}):
    bad("model.preset", value, "model")

# Huge numbers: each has an upper bound, so a typo fails here and not hours into a study.
HUGE = [
    ("train.tokens", 1e30),
    ("train.tokens", 10**20),
    ("train.batch_size", 1e12),
    ("train.seq_len", 10**7),
    ("train.eval_every_tokens", 10**20),
    ("train.threads", 10**6),
    ("train.seed", 2**64),
    ("train.lr", int("9" * 400)),
    ("model.d_model", 1e9),
    ("model.d_model", 10**9),
    ("model.n_layers", 10**6),
    ("model.d_ff", 10**9),
    ("model.max_seq_len", 10**9),
    ("model.dim_model_base", 10**9),
    ("model.scale_emb", int("9" * 400)),
    ("data.vocab_size", 10**12),
    ("data.vocab_size", (1 << 24) + 1),
    ("train.schedule.warmup_steps", 10**16),
    ("train.schedule.decay_steps", 10**16),
    ("train.schedule.half_life_steps", 1e16),
    ("resources.cpu", 1e9),
    ("resources.gpu", 10**6),
    ("search.num_samples", 10**9),
    ("search.max_concurrent", 10**9),
    ("search.seed", 2**40),
    ("search.scheduler.brackets", 10**9),
]
for path, value in HUGE:
    bad(path, value)
bad("model.preset", "micro-" + "9" * 12, "model", "micro width")
case(
    "train.tokens_per_param=1e9",
    mutate(("train.tokens", DROP), ("train.tokens_per_param", 1e9)),
    "tokens_per_param",
)
case(
    "model.vocab_size=1e12",
    mutate(("model.vocab_size", 10**12), ("data.vocab_size", 10**12)),
    "vocab_size",
)
case(
    "train.schedule.cosine_steps=1e16",
    mutate(("train.schedule", {"kind": "cosine", "cosine_steps": 10**16})),
    "cosine_steps",
)
case("branching.steps=[1e14]", mutate(("branching", {"steps": [10**14]})), "branching.steps")
case(
    "branching.longest-decay",
    mutate(("branching", {"steps": [10**13 // 32], "decay_fractions": [0.999]})),
    "branching.steps",
    "longest branch",
)
case(
    "grid-of-a-million-trials",
    mutate(
        (
            "search.space",
            {
                f"train.{k}": {"grid": list(range(1, 101))}
                for k in ("eval_every", "eval_tokens", "checkpoint_every")
            },
        )
    ),
    "search.space",
    "100,000 trials",
)
case(
    "uniform-to-huge-int",
    mutate(
        ("search.algorithm", "random"), ("search.space|train.lr", {"uniform": [0, int("9" * 400)]})
    ),
    "train.lr",
    "finite numbers",
)

# Negative numbers, zero, NaN and ±inf on every numeric key (zero where it is not allowed).
NUMERIC = {  # path -> zero is a valid value there
    "train.lr": False,
    "train.batch_size": False,
    "train.seq_len": False,
    "train.tokens": False,
    "train.eval_every": False,
    "train.eval_every_tokens": False,
    "train.eval_tokens": False,
    "train.checkpoint_every": True,
    "train.divergence_ratio": False,
    "train.seed": True,
    "train.threads": True,
    "train.schedule.warmup_steps": True,
    "train.schedule.min_lr_ratio": False,  # 0 is allowed only for decay shapes other than exp
    "train.schedule.decay_fraction": False,
    "train.optimizer.eps": False,
    "train.optimizer.weight_decay": True,
    "train.optimizer.grad_clip": True,
    "model.d_model": False,
    "model.n_layers": False,
    "model.n_heads": False,
    "model.d_ff": False,
    "model.vocab_size": False,
    "model.scale_emb": False,
    "model.scale_depth": False,
    "model.init_std": False,
    "model.rope_theta": False,
    "model.norm_eps": False,
    "data.vocab_size": False,
    "data.val_fraction": False,
    "data.character_coverage": False,
    "data.max_chars": False,
    "data.seed": True,
    "search.num_samples": False,
    "search.max_concurrent": False,
    "search.seed": True,
    "search.scheduler.grace_fraction": False,
    "search.scheduler.reduction_factor": False,
    "search.scheduler.brackets": False,
    "resources.cpu": False,
    "resources.gpu": True,
}
for path, zero_ok in NUMERIC.items():
    for value in (-1, math.nan, math.inf, -math.inf) + (() if zero_ok else (0,)):
        bad(path, value)
for value in ([-0.1, 0.9], [0.9, 1.0], [math.nan, 0.9]):
    bad("train.optimizer.betas", value)
for value in ([0], [-4], [8, 4], [4, 4]):
    bad("branching.steps", value, "steps")
for value in ([0], [1], [math.nan], []):
    raw = mutate(("branching", {**BRANCHING, "decay_fractions": value}))
    case(f"branching.decay_fractions={value}", raw, "branching", "decay_fractions")
for value in (0, -1, math.nan):
    raw = mutate(("train.tokens", DROP), ("train.tokens_per_param", value))
    case(f"train.tokens_per_param={value}", raw, "tokens_per_param")
case("tokens-and-tokens_per_param", mutate(("train.tokens_per_param", 10)), "tokens_per_param")
case("no-budget", mutate(("train.tokens", DROP)), "tokens")
case("seq_len-beyond-model", mutate(("train.seq_len", 4096)), "seq_len", "max_seq_len")

# Unknown keys at every level.
for section in (
    "",
    "model",
    "train",
    "train.schedule",
    "train.optimizer",
    "data",
    "search",
    "search.scheduler",
    "resources",
    "tracking",
    "tracking.wandb",
):
    path = f"{section}.bogus_key" if section else "bogus_key"
    bad(path, 1, "bogus_key")
case("branching.bogus_key", mutate(("branching", {**BRANCHING, "bogus_key": 1})), "bogus_key")
case("analysis.bogus_key", mutate(("analysis", {**ANALYSIS, "bogus_key": 1})), "bogus_key")
case("unknown-analysis-kind", mutate(("analysis", {"kind": "astrology"})), "analysis.kind")
case(
    "analysis-of-unsearched-key",
    mutate(("analysis", {**ANALYSIS, "width_key": "model.d_model"})),
    "width_key",
)
case("int-key-among-str-keys", dump(BASE) + "1: one\n2024-01-01: x\n", "unknown key")

# The search space: empty, impossible, outside the searchable keys, or naming no field.
SPACES = {
    "hyperopt-empty": ({"algorithm": "hyperopt", "space": {}}, "hyperopt needs"),
    "hyperopt-null-space": ({"algorithm": "hyperopt", "space": None}, "search.space"),
    "grid-empty": ({"space": {"train.lr": {"grid": []}}}, "non-empty list"),
    "choice-empty": ({"algorithm": "random", "space": {"train.lr": {"choice": []}}}, "non-empty"),
    "no-kind": ({"space": {"train.lr": {}}}, "expected one of"),
    "two-kinds": ({"space": {"train.lr": {"grid": [1], "choice": [2]}}}, "expected one of"),
    "unknown-kind": ({"space": {"train.lr": {"normal": [0, 1]}}}, "unknown distribution"),
    "range-in-grid": ({"space": {"train.lr": {"uniform": [0.1, 1]}}}, "algorithm grid"),
    "grid-in-random": ({"algorithm": "random", "space": {"train.lr": {"grid": [1]}}}, "choice"),
}
RANGES = {
    "equal-ends": ("uniform", [1, 1], "empty range"),
    "reversed": ("uniform", [2, 1], "empty range"),
    "log-negative": ("loguniform", [-1, 1], "log range"),
    "log-zero": ("loguniform", [0, 1], "log range"),
    "q-zero": ("quniform", [0.1, 1, 0], "q="),
    "q-too-big": ("quniform", [0.1, 1, 5], "q="),
    "randint-empty": ("randint", [5, 5], "empty range"),
    "strings": ("uniform", ["a", "b"], "finite numbers"),
    "nan-end": ("uniform", [math.nan, 1], "finite numbers"),
    "inf-end": ("loguniform", [1e-3, math.inf], "finite numbers"),
    "bool-end": ("uniform", [False, True], "finite numbers"),
    "three-for-two": ("uniform", [0.1, 0.2, 0.3], "finite numbers"),
    "one-for-two": ("loguniform", [0.1], "finite numbers"),
    "end-invalid-for-key": ("uniform", [-1.0, 0.1], "value -1.0 is invalid"),
}
for ident, (kind, args, fragment) in RANGES.items():
    SPACES[f"range-{ident}"] = (
        {"algorithm": "random", "space": {"train.lr": {kind: args}}},
        fragment,
    )
SEARCH_KEYS = {  # searched key -> fragment of the error
    "data.vocab_size": "model. or train.",
    "resources.cpu": "model. or train.",
    "search.seed": "model. or train.",
    "name": "model. or train.",
    "lr": "model. or train.",
    "model": "model. or train.",
    "train.schedule.a.b.c": "model. or train.",
    "train.lrr": "unknown key",
    "train.schedule.kindd": "unknown key",
    "train.optimizer.beta": "unknown key",
    "model.widht": "unknown ModelConfig field",
    "model.preset.width": "not a mapping",
    "train.": "unknown key",
}
for key, fragment in SEARCH_KEYS.items():
    SPACES[f"key-{key}"] = ({"space": {key: {"grid": [1, 2]}}}, fragment)
# Integer keys take randint or choice: a float range would hand trials values like 37.4.
for ident, (key, kind, args) in {
    "uniform": ("model.d_model", "uniform", [32, 128]),
    "loguniform": ("train.batch_size", "loguniform", [2, 8]),
    "quniform": ("train.schedule.warmup_steps", "quniform", [0, 10, 2]),
    "qloguniform": ("train.eval_every_tokens", "qloguniform", [64, 4096, 64]),
}.items():
    SPACES[f"float-range-on-int-{ident}"] = (
        {"algorithm": "random", "space": {key: {kind: args}}},
        f"{key} is an integer but {kind} samples floats; use {{randint",
    )
SPACES["key-not-a-string"] = ({"space": {1: {"grid": [1]}}}, "search.space.1")
SPACES["preset-missing"] = ({"space": {"model.preset": {"grid": ["micro-64", "gpt-9"]}}}, "gpt-9")
SPACES["value-invalid"] = ({"space": {"train.batch_size": {"grid": [8, -1]}}}, "value -1")
SPACES["value-wrong-type"] = ({"space": {"train.lr": {"grid": ["fast"]}}}, "'fast'")
SPACES["branching-searches-batch"] = (
    {"space": {"train.batch_size": {"grid": [2, 4]}}},
    "branching study fixes",
)
for ident, (search, fragment) in SPACES.items():
    raw = mutate(*((f"search.{k}", v) for k, v in search.items()))
    if ident == "branching-searches-batch":
        raw["branching"] = BRANCHING
    case(f"search:{ident}", raw, "search", fragment)

# Names: the study's folder under the storage root.
NAMES = [
    "a/b",
    "../escape",
    "..",
    ".",
    "/abs/path",
    "",
    " ",
    "x" * 65,
    "名前",
    "café",
    "abc\n",
    "a..b",
    "-lead",
    "_lead",
    "a b",
    "a\\b",
    "a\x00b",
    "C:\\runs",
]
for value in NAMES:
    bad("name", value, "name", "is not allowed")
bad("name", None, "name")
case("no-name", mutate(("name", DROP)), "name")
case("no-question", mutate(("question", DROP)), "question")

# Presets that do not exist.
for value in ("gpt-9", "micro-7", "micro-0", "micro-", "", "MICRO-32", " micro-32"):
    bad("model.preset", value, "model")
case("no-preset", mutate(("model", {"d_model": 64})), "model.preset")
bad("model.d_model", 33, "must divide d_model=33")
bad("model.d_model", 34, "must be even")  # 2 heads of 17 channels: RoPE rotates pairs

N_FILE_INPUTS = len(CASES)

# `--set` overrides, given on the command line to a valid file.
OVERRIDES = [
    ("train.lr=fast", "train.lr"),
    ("train.lr", "expected key.path=value"),
    ("=1", "expected key.path=value"),
    ("name=a/b", "name"),
    ("train.lr=[", "--set train.lr"),
    ("model.preset.width=64", "not a mapping"),
    ("train.tokens=1e30", "tokens"),
    ("train.bogus=1", "train.bogus"),
    ("name=!!python/name:os.system", "--set name"),
]
N_INPUTS = N_FILE_INPUTS + len(OVERRIDES) + 2  # + a missing file and a directory


@pytest.fixture(autouse=True)
def no_study_runs(monkeypatch):
    """A bad spec must never get as far as a study (which would start Ray)."""
    from sandbox_service import study

    def refuse(*args, **kwargs):
        raise AssertionError("an invalid spec reached run_study")

    monkeypatch.setattr(study, "run_study", refuse)


def run_cli(tmp_path: Path, spec_path: Path, capsys, *extra: str) -> str:
    """`sandbox run`; asserts the refusal (status 2, nothing written) and returns the error."""
    storage = tmp_path / "runs"
    status = cli.main(["run", str(spec_path), "--storage", str(storage), *extra])
    err = capsys.readouterr().err
    assert status == 2, err
    assert not storage.exists(), "a refused spec wrote to the storage root"
    assert err.startswith("error: ") and err.count("\n") >= 1
    return err


@pytest.mark.parametrize(
    ("content", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_file_is_refused_naming_file_and_key(tmp_path, capsys, content, fragments):
    path = tmp_path / "spec.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    err = run_cli(tmp_path, path, capsys)
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    with pytest.raises(SpecError):  # the library refuses it the same way
        load_spec(path)


@pytest.mark.parametrize(("override", "fragment"), OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_bad_override_is_refused(tmp_path, capsys, override, fragment):
    path = tmp_path / "spec.yaml"
    path.write_text(dump(BASE))
    err = run_cli(tmp_path, path, capsys, "--set", override)
    assert (str(path) in err or "--set" in err) and fragment in err, err


def test_missing_file_and_directory_are_refused(tmp_path, capsys):
    assert "no such file" in run_cli(tmp_path, tmp_path / "missing.yaml", capsys)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "cannot read" in run_cli(tmp_path, folder, capsys)


def test_the_base_spec_and_its_sections_are_valid(tmp_path):
    """Every refusal above is due to its mutation: the spec it mutates loads, with the
    branching and analysis sections the sweep mutates too."""
    path = tmp_path / "spec.yaml"
    widths = {"grid": ["micro-32", "micro-64"]}
    raw = mutate(
        ("branching", BRANCHING), ("analysis", ANALYSIS), ("search.space|model.preset", widths)
    )
    path.write_text(dump(raw))
    spec = load_spec(path)
    assert spec.name == "bad-input" and spec.branching.steps == (4, 8)
    for ident, raw in {
        "tokens_per_param": mutate(("train.tokens", DROP), ("train.tokens_per_param", 10)),
        "bounds": mutate(("train.tokens", 10**15), ("train.batch_size", 10**7), ("train.seed", 0)),
        "zero-ok": mutate(*((p, 0) for p, ok in NUMERIC.items() if ok)),
        "int-and-float-ranges": mutate(
            ("search.algorithm", "random"),
            ("search.scheduler", DROP),
            (
                "search.space",
                {
                    "train.schedule.warmup_steps": {"randint": [0, 4]},
                    "model.n_layers": {"choice": [2, 3]},
                    "train.lr": {"loguniform": [0.001, 0.1]},
                    "model.scale_emb": {"uniform": [4.0, 12.0]},
                },
            ),
        ),
        "step-bounds": mutate(
            ("train.schedule", {"kind": "cosine", "warmup_steps": 1, "cosine_steps": 10**15})
        ),
    }.items():
        path.write_text(dump(raw))
        assert load_spec(path).name == "bad-input", ident


def test_yaml_merge_keys_still_work():
    text = "base: &b {lr: 0.01, batch_size: 8}\ntrain:\n  <<: *b\n  lr: 0.03\n"
    assert yaml_safe.loads(text)["train"] == {"lr": 0.03, "batch_size": 8}


def test_sweep_size_and_coverage(capsys):
    """The sweep's size, printed once for the record; no case shadows another, and every
    section of the file gets an unknown key and every numeric key its non-finite values."""
    with capsys.disabled():
        print(f"\nbad-input sweep: {N_INPUTS} inputs ({N_FILE_INPUTS} files)")
    idents = [c[0] for c in CASES]
    assert len(set(idents)) == len(idents) == N_FILE_INPUTS, "two cases share an id"
    assert sum(i.endswith("bogus_key=1") or i.endswith("bogus_key") for i in idents) == 13
    for path in NUMERIC:
        assert {f"{path}=nan", f"{path}=inf", f"{path}=-inf", f"{path}=-1"} <= set(idents)
    assert N_INPUTS >= 450


def test_data_and_schedule_bounds_hold_without_a_spec():
    """The bounds belong to the configs themselves, not only to the spec that builds them."""
    from trainables.data import DataConfig
    from trainables.schedules import ScheduleConfig

    assert DataConfig(vocab_size=1 << 24).vocab_size == 1 << 24
    with pytest.raises(ValueError, match=r"DataConfig\.vocab_size=16777217 .*263\.\.16777216"):
        DataConfig(vocab_size=(1 << 24) + 1)
    for field in ("warmup_steps", "decay_steps"):
        ScheduleConfig(**{field: 10**15})
        with pytest.raises(ValueError, match=rf"ScheduleConfig\.{field}={10**15 + 1} is invalid"):
            ScheduleConfig(**{field: 10**15 + 1})


def test_unhashable_analysis_kind_is_refused(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(dump(mutate(("analysis", {"kind": ["lr_transfer"]}))))
    assert "analysis.kind" in run_cli(tmp_path, path, capsys)

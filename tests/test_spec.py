"""Search-space files: every shipped one loads; bad ones fail fast naming file, key and rule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sandbox_service import yaml_safe
from sandbox_service.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
# every study file; pipeline files (a `stages:` mapping) are tested in test_pipeline_spec.py
SHIPPED = sorted(
    p for p in (ROOT / "search_spaces").rglob("*.yaml") if "\nstages:" not in p.read_text()
)

BASE = {
    "name": "t",
    "question": "q",
    "model": {"preset": "micro-32"},
    "data": {"vocab_size": 512, "max_chars": 10000},
    "train": {"tokens": 4096, "batch_size": 2, "seq_len": 16},
    "search": {"algorithm": "grid", "space": {"train.lr": {"grid": [0.01, 0.02]}}},
}


def spec_with(path: str, value):
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_search_space_loads(path):
    spec = load_spec(path)
    assert spec.name and spec.question
    assert spec.source == str(path)


def test_shipped_files_exist():
    names = {p.name for p in SHIPPED}
    assert "smoke.yaml" in names and len(names) >= 2


def test_valid_spec_parses_to_typed_configs():
    spec = parse_spec(copy.deepcopy(BASE), "base.yaml")
    assert [d.path for d in spec.space] == ["train.lr"]
    assert spec.space[0].args == (0.01, 0.02)
    assert spec.fingerprint() == parse_spec(copy.deepcopy(BASE)).fingerprint()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("trian", {}, "trian: unknown key; allowed keys"),
        ("train.lrr", 0.1, "train.lrr: unknown key"),
        ("train.batch_size", "eight", "train.batch_size: expected an integer"),
        ("train.batch_size", -4, "batch_size=-4"),
        ("train.lr", float("nan"), "train.lr: expected a finite number"),
        ("model.preset", "micro-7", "model"),
        ("model.preset", "gpt-9", "gpt-9"),
        ("name", "../escape", "name: '../escape' is not allowed"),
        ("name", "a/b", "is not allowed"),
        ("search.algorithm", "bayes", "algorithm='bayes': allowed grid, random, hyperopt"),
        ("search.space", {"train.lr": {"grid": []}}, "expected a non-empty list"),
        ("search.space", {"train.lr": {"loguniform": [0.1, 0.01]}}, "empty range"),
        ("search.space", {"train.lr": {"loguniform": [0, 0.01]}}, "log range needs low > 0"),
        ("search.space", {"train.lr": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ("search.space", {"data.vocab_size": {"grid": [1, 2]}}, "prepared once per study"),
        ("search.space", {"train.lr": {"grid": [0.01, -1.0]}}, "value -1.0 is invalid"),
        ("search.space", {"train.lr": {"uniform": [0.01, 0.1]}}, "algorithm grid takes only"),
        ("resources.cpu", 0, "cpu=0.0"),
    ],
)
def test_bad_specs_name_the_key(path, value, message):
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(path, value), "bad.yaml")
    text = str(err.value)
    assert text.startswith("bad.yaml: ")
    assert message in text


def test_hyperopt_rejects_grid_and_accepts_ranges():
    raw = spec_with(
        "search",
        {"algorithm": "hyperopt", "num_samples": 4, "space": {"train.lr": {"grid": [0.01]}}},
    )
    with pytest.raises(SpecError, match="write {choice"):
        parse_spec(raw)
    raw["search"]["space"] = {
        "train.lr": {"loguniform": [1e-3, 1e-1]},
        "model.scale_emb": {"uniform": [1, 20]},
    }
    assert len(parse_spec(raw).space) == 2


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("name: a\nname: b\n")
    with pytest.raises(SpecError, match=r"dup.yaml: line 2: duplicate key 'name'"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_alias_bomb_is_refused():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(yaml_safe.YamlError, match="alias bomb"):
        yaml_safe.loads("\n".join(lines), "bomb.yaml")


def test_scientific_notation_is_a_number():
    assert yaml_safe.loads("lr: 1e-3\ntokens: 2e6") == {"lr": 0.001, "tokens": 2e6}


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml_safe.yaml.safe_dump(BASE))
    spec = load_spec(path, ["data.sources=[corpus.txt]", "train.lr=3e-3"])
    # relative paths are resolved where the command runs: trials run in their own folders
    assert spec.data.sources == (str(Path.cwd() / "corpus.txt"),) and spec.train["lr"] == 0.003
    with pytest.raises(SpecError, match="train.lr: expected a number"):
        load_spec(path, ["train.lr=fast"])
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(path, ["train.lr"])

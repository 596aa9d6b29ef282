"""Preference pairs: the three public layouts, errors that name file:line and field, the held-out
split, the epoch order and the embedded set built from the standard library."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from trainables import preference_data as pd
from trainables.corpus import stdlib_files
from trainables.preference_data import (
    EMBEDDED,
    PreferenceDataError,
    embedded_path,
    embedded_records,
    epoch_order,
    load_pairs,
    split_pairs,
)

HH = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! \n\nHuman: What is 2+2?\n\nAssistant: 4.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! \n\nHuman: What is 2+2?\n\nAssistant: 5",
}
ULTRA = {
    "prompt": "Name a prime.",
    "chosen": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
    ],
    "rejected": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "8"},
    ],
    "score_chosen": 9.0,
}


def _write(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_the_three_layouts_give_prompt_messages_and_two_responses(tmp_path):
    plain = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}
    src = _write(tmp_path / "p.jsonl", [plain, HH, ULTRA])
    first, hh, ultra = load_pairs(src)
    assert first.prompt == ({"role": "user", "content": "Say hi"},)
    assert (first.chosen, first.rejected) == ("Hi!", "No.")
    assert hh.prompt == (
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    )
    assert (hh.chosen, hh.rejected) == ("4.", "5")  # stripped, as parse_transcript strips turns
    assert ultra.prompt == tuple(ULTRA["chosen"][:2]) and (ultra.chosen, ultra.rejected) == (
        "7",
        "8",
    )
    assert hh.where.endswith("p.jsonl:2")


def test_an_ultrafeedback_pair_of_bare_responses_takes_its_prompt_field(tmp_path):
    record = {
        "prompt": "Q?",
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    }
    (pair,) = load_pairs(_write(tmp_path / "u.jsonl", [record]))
    assert pair.prompt == ({"role": "user", "content": "Q?"},)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, "no field 'rejected'"),
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, "field 'chosen' is int"),
        ({"prompt": ["a"], "chosen": "b", "rejected": "c"}, "field 'prompt' is list"),
        ({"chosen": "no turns here", "rejected": "x"}, "field 'chosen' has no"),
        ({**HH, "rejected": "\n\nHuman: Other\n\nAssistant: 4"}, "field 'rejected' does not start"),
        (
            {**ULTRA, "rejected": [{"role": "bot", "content": "8"}]},
            r"field 'rejected\[0\].role' is 'bot'",
        ),
        ({**ULTRA, "rejected": ULTRA["rejected"][1:]}, "fields 'chosen' and 'rejected' differ"),
        ({"prompt": "a <AI> b", "chosen": "b", "rejected": "c"}, "field 'chosen': .*chat marker"),
    ],
)
def test_errors_name_the_file_the_line_and_the_field(tmp_path, record, message):
    src = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "y", "rejected": "n"}, record])
    with pytest.raises(PreferenceDataError, match=rf"bad\.jsonl:2: {message}"):
        load_pairs(src)


def test_missing_files_folders_and_empty_globs_are_preference_errors(tmp_path):
    with pytest.raises(PreferenceDataError, match=r"nope\.jsonl: no such file \(preference source"):
        load_pairs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(PreferenceDataError, match="is a folder, not a file"):
        load_pairs(str(tmp_path))
    with pytest.raises(PreferenceDataError, match="no file matches this glob"):
        load_pairs(str(tmp_path / "*.jsonl"))


def test_bad_json_is_refused_with_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": \n')
    with pytest.raises(PreferenceDataError, match=r"broken\.jsonl:3: bad JSON"):
        load_pairs(str(path))


def test_gzip_globs_and_fsspec_urls_read_the_same_pairs(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines[: lines.index(b"q3") - 12]))
    (tmp_path / "b.jsonl").write_bytes(lines[lines.index(b"q3") - 12 :])
    with fsspec.open("memory://prefs/all.jsonl", "wb") as f:
        f.write(lines)
    from_glob = load_pairs(str(tmp_path / "*.jsonl*"))
    from_memory = load_pairs("memory://prefs/all.jsonl")
    prompts = [p.prompt[0]["content"] for p in from_glob]
    assert prompts == [f"q{i}" for i in range(5)]
    assert [p.prompt for p in from_memory] == [p.prompt for p in from_glob]


def test_the_held_out_split_hashes_the_prompt_and_keeps_order():
    pairs = [
        pd.PreferencePair(({"role": "user", "content": f"q{i % 40}"},), "a", f"b{i}", f"x:{i}")
        for i in range(400)
    ]
    train, val = split_pairs(pairs, 0.25, seed=0)
    assert len(train) + len(val) == 400 and 40 <= len(val) <= 160
    train_prompts = {p.prompt_key() for p in train}
    assert not train_prompts & {p.prompt_key() for p in val}  # one prompt, one side
    assert [p.where for p in train] == sorted((p.where for p in train), key=lambda w: int(w[2:]))
    again, _ = split_pairs(pairs, 0.25, seed=0)
    assert [p.where for p in again] == [p.where for p in train]
    assert [p.where for p in split_pairs(pairs, 0.25, seed=1)[0]] != [p.where for p in train]


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a, b = epoch_order(1000, seed=3, epoch=0), epoch_order(1000, seed=3, epoch=0)
    assert np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(1000))
    assert not np.array_equal(a, epoch_order(1000, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(1000, seed=4, epoch=0))


def test_embedded_records_are_deterministic_and_every_rejected_differs(monkeypatch):
    monkeypatch.setattr(pd, "stdlib_files", lambda: stdlib_files()[:40])
    records = embedded_records(max_pairs=60)
    assert records == embedded_records(max_pairs=60)
    assert 20 <= len(records) <= 60
    assert all(r["chosen"] != r["rejected"] for r in records)
    assert {r["rejected_kind"] for r in records} == {"other", "shuffled", "truncated"}
    shuffled = next(r for r in records if r["rejected_kind"] == "shuffled")
    assert sorted(shuffled["chosen"].split()) == sorted(shuffled["rejected"].split())
    assert all(r["prompt"].startswith("What does the Python function `") for r in records)


def test_the_embedded_set_is_built_once_and_read_like_any_file(private_cache):
    path = embedded_path()
    assert embedded_path() == path and path.parent == private_cache / "preferences"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # atomic
    pairs = load_pairs(EMBEDDED)
    assert 2000 <= len(pairs) <= 4000  # a few thousand
    chosen = [p.chosen for p in pairs]
    assert len(set(chosen)) == len(chosen)  # one docstring paragraph, one prompt
    _, val = split_pairs(pairs, 0.05)
    assert 0.03 * len(pairs) < len(val) < 0.07 * len(pairs)

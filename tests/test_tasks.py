"""Task files: the public layouts normalised, errors by file:line:field, few-shot prompt layout,
and the offline default tasks built from the standard library."""

from __future__ import annotations

import ast
import gzip
import json
import operator
import sysconfig
from pathlib import Path

import pytest

from trainables import eval_data
from trainables.tasks import (
    GenItem,
    MCItem,
    TaskError,
    gen_prompt,
    load_task,
    loglik_request,
    mc_generate_prompt,
)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


LAYOUTS = [
    ({"question": "2+2?", "choices": ["3", "4"], "answer": 1}, "qa"),
    ({"question": "2+2?", "choices": ["3", "4"], "answer": "B"}, "qa"),
    ({"question": "2+2?", "choices": ["3", "4"], "answer": "4"}, "qa"),  # the right text
    ({"question": "2+2?", "A": "3", "B": "4", "answer": "B"}, "qa"),  # MMLU columns
    (
        {
            "question": "2+2?",
            "choices": {"text": ["3", "4"], "label": ["1", "2"]},
            "answerKey": "2",
        },
        "qa",
    ),
    (
        {
            "question": {
                "stem": "2+2?",
                "choices": [{"text": "3", "label": "A"}, {"text": "4", "label": "B"}],
            },
            "answerKey": "B",
        },
        "qa",
    ),
    ({"ctx": "2+2?", "endings": ["3", "4"], "label": "1"}, "completion"),  # HellaSwag
    ({"ctx_a": "2+2", "ctx_b": "?", "endings": ["3", "4"], "label": 1}, "completion"),
]


@pytest.mark.parametrize("record, style", LAYOUTS)
def test_public_layouts_normalise_to_one_item(tmp_path, record, style):
    task = load_task(write_jsonl(tmp_path / "t.jsonl", [record]))
    question = "2+2 ?" if "ctx_a" in record else "2+2?"
    assert task.items == (MCItem(question, ("3", "4"), 1, style),)
    assert (task.kind, task.checker, task.name) == ("mc", "letter", "t")


def test_generation_layouts_pick_their_checker_and_budget(tmp_path):
    gsm = load_task(
        write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "3 + 4 = 7\n#### 7"}])
    )
    assert (gsm.kind, gsm.checker, gsm.max_new_tokens, gsm.stop) == (
        "gen",
        "number",
        256,
        ("\n\n", "Question:"),
    )
    short = load_task(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "reference": 12}]))
    assert short.items == (GenItem("p", "12"),) and short.checker == "number"
    assert short.stop == ("\n",) and short.max_new_tokens == 6
    words = load_task(write_jsonl(tmp_path / "w.jsonl", [{"prompt": "p", "answer": "os.path"}]))
    assert words.checker == "exact"


def test_compressed_files_and_spec_options_are_read(tmp_path):
    path = tmp_path / "mmlu_test.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n\n")
    dev = write_jsonl(
        tmp_path / "dev.jsonl", [{"question": "d", "choices": ["a", "b"], "answer": 1}]
    )
    task = load_task(f"{path}#dev={dev}&name=mmlu")
    assert task.name == "mmlu" and len(task.items) == 1 and len(task.dev) == 1
    assert load_task(str(path)).name == "mmlu_test"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": 5}', r"t.jsonl:2: field 'answer'=5"),
        ('{"question": "q", "choices": ["a"], "answer": 0}', r"t.jsonl:2: field 'choices'"),
        ('{"question": "q", "choices": ["a", "b"]}', r"t.jsonl:2: field 'answer' is missing"),
        ('{"question": "", "A": "a", "B": "b", "answer": "A"}', r"t.jsonl:2: field 'question'"),
        (
            '{"question": "q", "A": "a", "B": "b", "D": "d", "answer": "A"}',
            r"t.jsonl:2: option columns",
        ),
        ('{"ctx": "c", "endings": ["a", "b"], "label": "x"}', r"t.jsonl:2: field 'label'='x'"),
        ('{"prompt": "p"}', r"t.jsonl:2: field 'answer' is missing"),
        ('{"prompt": "p", "answer": " "}', r"t.jsonl:2: field 'answer'=' ' must be"),
        ('{"text": "t"}', r"t.jsonl:2: unknown layout \(fields: text\)"),
        ('{"question": "q", "choices"', r"t.jsonl:2: bad JSON"),
        ('["q"]', r"t.jsonl:2: expected a JSON object, got list"),
        ('{"prompt": "p", "answer": "a"}', r"mixes multiple-choice and generation"),
    ],
)
def test_errors_name_the_file_line_and_field(tmp_path, line, message):
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
    (tmp_path / "t.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(TaskError, match=message):
        load_task(str(tmp_path / "t.jsonl"))


def test_bad_specs_and_files_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(TaskError, match="option 'shots'"):
        load_task(path + "#shots=3")
    with pytest.raises(TaskError, match="checker='letter'"):
        load_task(path + "#checker=letter")
    with pytest.raises(TaskError, match="no such task file"):
        load_task(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="no items"):
        load_task(str(tmp_path / "empty.jsonl"))


def test_few_shot_prompts_have_the_documented_layout(tmp_path):
    ex = MCItem("Capital of France?", ("Rome", "Paris"), 1)
    item = MCItem("2+2?", ("3", "4"), 1)
    context, options = loglik_request(item, (ex,))
    assert context == "Question: Capital of France?\nAnswer: Paris\n\nQuestion: 2+2?\nAnswer:"
    assert options == [" 3", " 4"]
    assert mc_generate_prompt(item, (ex,)) == (
        "Question: Capital of France?\nA. Rome\nB. Paris\nAnswer: B\n\n"
        "Question: 2+2?\nA. 3\nB. 4\nAnswer:"
    )
    cloze = MCItem("def f():\n", ("    return 1", "x = 2"), 0, "completion")
    assert loglik_request(cloze, ()) == ("def f():\n", ["    return 1", "x = 2"])
    assert loglik_request(MCItem("A cat", ("sat", "ran"), 0, "completion"), ())[1] == [
        " sat",
        " ran",
    ]
    assert gen_prompt(GenItem("1+1?", "2"), (GenItem("2+2?", "4"),)) == (
        "Question: 2+2?\nAnswer: 4\n\nQuestion: 1+1?\nAnswer:"
    )


def test_few_shot_examples_are_deterministic_nested_and_never_scored(tmp_path):
    records = [{"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(10)]
    head = load_task(write_jsonl(tmp_path / "t.jsonl", records))
    examples, scored = head.split(3)
    assert [e.question for e in examples] == ["q0", "q1", "q2"] and len(scored) == 7
    assert not set(examples) & set(scored)
    dev = write_jsonl(
        tmp_path / "dev.jsonl", [dict(r, question=f"d{i}") for i, r in enumerate(records)]
    )
    task = load_task(f"{tmp_path / 't.jsonl'}#dev={dev}")
    three, scored = task.split(3)
    five, _ = task.split(5)
    assert scored == task.items and five[:3] == three and three == task.split(3)[0]
    assert [e.question for e in three] != ["d0", "d1", "d2"]  # drawn, not the head
    with pytest.raises(ValueError, match="has 10 dev items"):
        task.split(11)
    with pytest.raises(ValueError, match="has only 10 items"):
        head.split(10)


STDLIB = Path(sysconfig.get_paths()["stdlib"])
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class FakeSources(eval_data.Sources):
    definitions = [
        (f"mod{i % 7}", f"func_{i:03d}", f"Compute the thing number {i}.") for i in range(300)
    ]
    validation = [
        "\n".join(f"    value_{d}_{i} = compute(thing_{i}, {d})" for i in range(20))
        for d in range(100)
    ]


def test_task_builders_are_deterministic_and_their_answers_right():
    for name, build in eval_data.TASKS.items():
        a, b = build(FakeSources()), build(FakeSources())
        assert a == b and len(a) == eval_data.N_DEV + eval_data.N_TEST, name
    for r in eval_data.build_stdlib_mc(FakeSources()):
        number = int(r["question"].split("func_")[1][:3])
        assert r["choices"][r["answer"]] == f"mod{number % 7}" and len(set(r["choices"])) == 4
    for r in eval_data.build_arith_gen(FakeSources()):
        a, op, b = r["question"].removeprefix("What is ").removesuffix("?").split()
        assert int(r["answer"]) == OPERATORS[op](int(a), int(b))
    for r in eval_data.build_cloze_mc(FakeSources()):
        assert r["endings"][r["label"]].strip() not in r["ctx"]
        assert len({e[: len(e) - len(e.lstrip())] for e in r["endings"]}) == 1  # one indentation


def test_the_embedded_default_tasks_build_offline_and_hold_true_facts(tmp_path):
    specs, heldout = eval_data.resolve(eval_data.default_tasks(), [eval_data.HELDOUT], tmp_path)
    tasks = {t.name: t for t in map(load_task, specs)}
    assert list(tasks) == eval_data.default_tasks()
    for task in tasks.values():
        assert len(task.items) == eval_data.N_TEST and len(task.dev) == eval_data.N_DEV
    assert tasks["embedded:arith-gen"].checker == "number"
    for item in tasks["embedded:stdlib-mc"].items[:20]:
        function = item.question.split("function ")[1].removesuffix("()?")
        path = STDLIB.joinpath(*item.choices[item.answer].split("."))
        source = (
            path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
        )
        tree = ast.parse(source.read_bytes())
        assert function in {getattr(n, "name", None) for n in tree.body}, (source, function)
    assert heldout[0].endswith("#name=embedded:stdlib-val")
    again, _ = eval_data.resolve(eval_data.default_tasks(), [], tmp_path)
    assert again == specs  # built once, then reused

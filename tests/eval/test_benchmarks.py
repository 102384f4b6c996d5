"""Benchmark registry: file lookup and its errors, field aliases, multiple-choice formatting, built-in sets."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from m2flow.data.datasets import BadRowError, DataError
from m2flow.eval.benchmarks import (
    BENCHMARKS,
    CHOICE_INSTRUCTION,
    MATH_INSTRUCTION,
    format_choices,
    get_benchmark,
    load_benchmark,
    synthetic_math,
    synthetic_mc,
)
from m2flow.rewards import REWARDS


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_registry_holds_the_standard_names_and_unknown_names_list_them() -> None:
    assert list(BENCHMARKS) == ["aime24", "aime25", "gpqa_diamond", "math500", "gsm8k", "amc23",
                                "synthetic_math", "synthetic_mc"]
    assert get_benchmark("gpqa_diamond").kind == "multiple_choice"
    for spec in BENCHMARKS.values():
        assert spec.kind in REWARDS  # each kind is scored by the reward of that name
    with pytest.raises(KeyError, match="unknown benchmark 'aime2'; valid names: aime24, aime25, gpqa_diamond"):
        load_benchmark("aime2")


def test_a_file_benchmark_without_data_dir_names_the_file_and_fields() -> None:
    with pytest.raises(DataError) as e:
        load_benchmark("aime24")
    message = str(e.value)
    for part in ("--data-dir", "aime24.jsonl or aime24.parquet or aime24.csv", "problem | question",
                 "answer | Answer", "solution", "HuggingFaceH4/aime_2024"):
        assert part in message, part


def test_a_missing_file_names_the_directory_file_and_choice_fields(tmp_path) -> None:
    (tmp_path / "gpqa.jsonl").write_text("{}\n")  # not the expected name
    with pytest.raises(DataError) as e:
        load_benchmark("gpqa_diamond", str(tmp_path))
    message = str(e.value)
    assert f"no gpqa_diamond.jsonl or gpqa_diamond.parquet or gpqa_diamond.csv in {tmp_path}" in message
    assert "'Correct Answer' with 'Incorrect Answer 1'" in message and "choices" in message


def test_math_fields_by_their_public_names(tmp_path) -> None:
    write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "1+1?", "answer": "2", "unique_id": "test/a.json", "level": 1},  # MATH-500
        {"Problem": "2+2?", "Answer": 4.0, "ID": "2024-I-2"},  # Maxwell-Jia/AIME_2024: a float answer
        {"question": "3+3?", "solution": "So $x = 6$, and \\boxed{6}."},  # an answer only in the solution
        {"question": "Tom has 1,200.", "answer": "He has 1,200 + 34 = 1,234.\n#### 1,234"},  # GSM8K
    ])
    bench = load_benchmark("math500", str(tmp_path))
    assert bench.path == str(tmp_path / "math500.jsonl")
    assert [p.answer for p in bench.problems] == ["2", "4", "6", "1,234"]
    assert [p.meta["id"] for p in bench.problems] == ["test/a.json", "2024-I-2", "2", "3"]  # else the row number
    assert bench.problems[0].question == f"1+1?\n\n{MATH_INSTRUCTION}"
    assert bench.problems[0].meta["level"] == 1
    assert [p.question for p in load_benchmark("math500", str(tmp_path), num_problems=2).problems] == [
        p.question for p in bench.problems[:2]]


def test_parquet_files_load_like_jsonl(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [60, 61], "problem": ["a?", "b?"], "answer": ["7", "\\frac{1}{2}"]}),
                   tmp_path / "aime25.parquet")
    bench = load_benchmark("aime25", str(tmp_path))
    assert [(p.meta["id"], p.answer) for p in bench.problems] == [("60", "7"), ("61", "\\frac{1}{2}")]


def test_a_row_without_answer_is_an_error_naming_its_line_and_the_fields(tmp_path) -> None:
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "ok?", "answer": "1"}, {"question": "no answer", "x": 1}])
    with pytest.raises(BadRowError, match=r"gsm8k.jsonl:2: no answer; gsm8k expects .*answer \| Answer.* \(row has: "
                                          r"question, x\)"):
        load_benchmark("gsm8k", str(tmp_path))
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"id": 1, "question": "a", "answer": "1"},
                                           {"id": 1, "question": "b", "answer": "2"}])
    with pytest.raises(BadRowError, match="gsm8k.jsonl:2: problem id '1' was already used at .*gsm8k.jsonl:1"):
        load_benchmark("gsm8k", str(tmp_path))


def test_format_choices_shuffles_by_key_and_letters_the_correct_one() -> None:
    text, letter = format_choices("Q?", ["right", "w1", "w2", "w3"], 0, "key-1")
    assert text.startswith("Q?\n\n") and text.count("\n") == 5
    lines = text.split("\n")[2:]
    assert sorted(line[3:] for line in lines) == ["right", "w1", "w2", "w3"]
    assert [line[:3] for line in lines] == ["A) ", "B) ", "C) ", "D) "]
    assert f"{letter}) right" in lines
    assert format_choices("Q?", ["right", "w1", "w2", "w3"], 0, "key-1") == (text, letter)  # same key, same order
    orders = {format_choices("Q?", ["right", "w1", "w2", "w3"], 0, f"key-{i}")[0] for i in range(20)}
    assert len(orders) > 5  # other keys, other orders


def test_gpqa_csv_rows_become_shuffled_lettered_questions(tmp_path) -> None:
    header = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
              "Incorrect Answer 3"]
    rows = [["rec1", "Which is a noble gas?", "Argon", "Oxygen", "Nitrogen", "Iron"],
            ["rec2", "2 + 2?", "4", "3", "5", "22"]]
    with open(tmp_path / "gpqa_diamond.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    bench = load_benchmark("gpqa_diamond", str(tmp_path))
    for p, row in zip(bench.problems, rows):
        assert p.meta["id"] == row[0]
        assert p.question.startswith(row[1] + "\n\nA) ") and p.question.endswith(f"\n\n{CHOICE_INSTRUCTION}")
        assert f"{p.answer}) {row[2]}\n" in p.question  # the letter points at the correct text
        for wrong in row[3:]:
            assert f") {wrong}\n" in p.question
    assert load_benchmark("gpqa_diamond", str(tmp_path)).problems == bench.problems  # the shuffle is fixed
    assert p.where == f"{tmp_path / 'gpqa_diamond.csv'}:3"


@pytest.mark.parametrize("answer", ["C", "(c)", 2, "Paris"])
def test_choice_lists_with_answer_as_letter_index_or_text(tmp_path, answer) -> None:
    write_jsonl(tmp_path / "gpqa_diamond.jsonl",
                [{"question": "Capital of France?", "choices": ["Rome", "Oslo", "Paris", "Bern"], "answer": answer}])
    (p,) = load_benchmark("gpqa_diamond", str(tmp_path)).problems
    assert f"{p.answer}) Paris\n" in p.question


def test_pre_formatted_choice_questions_are_used_as_they_are(tmp_path) -> None:
    question = "Pick one.\n(A) x\n(B) y\n(C) z\n(D) w"
    write_jsonl(tmp_path / "gpqa_diamond.jsonl", [{"question": question, "answer": "C"}])
    (p,) = load_benchmark("gpqa_diamond", str(tmp_path)).problems
    assert (p.question, p.answer) == (f"{question}\n\n{CHOICE_INSTRUCTION}", "C")
    write_jsonl(tmp_path / "gpqa_diamond.jsonl", [{"question": question, "answer": "42"}])
    with pytest.raises(BadRowError, match="gpqa_diamond.jsonl:1: no choices"):
        load_benchmark("gpqa_diamond", str(tmp_path))


def test_synthetic_math_is_the_held_out_split_of_the_runner() -> None:
    from m2flow.config import Config
    from m2flow.data.task import load_task

    problems = synthetic_math()
    assert len(problems) == 500 and [p.meta["id"] for p in problems[:3]] == ["0", "1", "2"]
    held_out = load_task(Config()).held_out  # what the demo evaluates on (the config's defaults)
    assert [dataclasses.replace(p, meta={k: v for k, v in p.meta.items() if k != "id"}) for p in problems] == held_out
    assert synthetic_math() == problems  # deterministic
    bench = load_benchmark("synthetic_math", num_problems=16)
    assert bench.problems == problems[:16] and bench.path == ""
    assert bench.problems[0].question == held_out[0].question  # no instruction: prompted as in training


def test_synthetic_mc_is_deterministic_gpqa_style() -> None:
    problems = synthetic_mc()
    assert len(problems) == 200 and synthetic_mc() == problems
    assert {p.answer for p in problems} == set("ABCD")
    for p in problems:
        body, instruction = p.question.rsplit("\n\n", 1)
        assert instruction == CHOICE_INSTRUCTION
        choices = body.split("\n\n")[1].split("\n")
        assert [c[:3] for c in choices] == ["A) ", "B) ", "C) ", "D) "]
        values = [int(c[3:]) for c in choices]
        assert len(set(values)) == 4 and min(values) >= 0
        assert values["ABCD".index(p.answer)] == int(p.meta["value"])  # the letter of the right value
        assert all(abs(v - int(p.meta["value"])) <= 10 for v in values)

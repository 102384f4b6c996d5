from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2flow.data.datasets import DataError, Problem, load_problems, save_problems


def write_jsonl(tmp_path, lines: list[str], name: str = "bad.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"question": "1+1?", "answer": "2"})


def test_jsonl_custom_fields_and_meta(tmp_path):
    rows = [
        {"problem": "What is 2+3?", "final": "5", "worked": "2+3=5", "id": 7},
        {"problem": "What is 4*4?", "final": "16", "source": "synthetic"},
    ]
    path = write_jsonl(tmp_path, [json.dumps(r) for r in rows] + [""], name="good.jsonl")
    problems = load_problems(path, prompt_key="problem", answer_key="final", solution_key="worked")
    assert problems == [
        Problem("What is 2+3?", "5", solution="2+3=5", meta={"id": 7}),
        Problem("What is 4*4?", "16", solution=None, meta={"source": "synthetic"}),
    ]


def test_jsonl_blank_lines_skipped_and_default_keys(tmp_path):
    path = write_jsonl(tmp_path, ["", GOOD, "   ", GOOD, ""], name="blank.jsonl")
    problems = load_problems(path)
    assert [p.answer for p in problems] == ["2", "2"]
    assert problems[0].solution is None and problems[0].meta == {}


def test_numeric_answers(tmp_path):
    answers = [12, 12.0, -3, 2.5, "007", 1e20]
    path = write_jsonl(tmp_path, [json.dumps({"question": "q", "answer": a}) for a in answers], name="num.jsonl")
    assert [p.answer for p in load_problems(path)] == ["12", "12", "-3", "2.5", "007", "100000000000000000000"]


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        ('["q", "2"]', "expected an object with fields, got list"),
        ('{"answer": "2", "id": 1}', "missing field 'question' (row has: answer, id)"),
        ('{"question": "q"}', "missing field 'answer' (row has: question)"),
        ('{"question": "   ", "answer": "2"}', "empty question"),
        ('{"question": 5, "answer": "2"}', "field 'question' must be a string, got int"),
        ('{"question": "q", "answer": [1, 2]}', "field 'answer' must be a string or number, got list"),
        ('{"question": "q", "answer": {"v": 1}}', "must be a string or number, got dict"),
        ('{"question": "q", "answer": null}', "must be a string or number, got NoneType"),
        ('{"question": "q", "answer": true}', "must be a string or number, got bool"),
        ('{"question": "q", "answer": NaN}', "not a finite number"),
        ('{"question": "q", "answer": " "}', "empty answer"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_line, reason):
    path = write_jsonl(tmp_path, [GOOD, "", bad_line, GOOD])  # line 3 (the blank line still counts)
    with pytest.raises(DataError) as err:
        load_problems(path)
    msg = str(err.value)
    assert "bad.jsonl:3" in msg
    assert reason in msg


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"question": "\xff", "answer": "1"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: invalid JSON"):
        load_problems(str(path))


def test_solution_of_wrong_type(tmp_path):
    path = write_jsonl(tmp_path, [json.dumps({"question": "q", "answer": "1", "solution": 3})])
    with pytest.raises(DataError, match="bad.jsonl:1: field 'solution' must be a string"):
        load_problems(path, solution_key="solution")


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="not found") as err:
        load_problems(path)
    assert path in str(err.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,answer\n")
    with pytest.raises(DataError, match=r"unsupported dataset file .*data\.csv.*\.jsonl, \.parquet"):
        load_problems(str(path))


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_parquet_round_trip(tmp_path):
    path = str(tmp_path / "train.parquet")
    table = pa.table({
        "prompt": ["What is 6*7?", "What is 10-4?"],
        "target": [42.0, 6.0],
        "solution": ["6*7=42", None],
        "level": [1, 2],
    })
    pq.write_table(table, path)
    problems = load_problems(path, prompt_key="prompt", answer_key="target", solution_key="solution")
    assert problems == [
        Problem("What is 6*7?", "42", solution="6*7=42", meta={"level": 1}),
        Problem("What is 10-4?", "6", solution=None, meta={"level": 2}),
    ]


def test_parquet_row_missing_field(tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"question": ["a", "b"], "label": ["1", "2"]}), path)
    with pytest.raises(DataError) as err:
        load_problems(path)
    msg = str(err.value)
    assert "bad.parquet row 1" in msg
    assert "missing field 'answer' (row has: question, label)" in msg


def test_parquet_row_empty_question(tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"question": ["a", ""], "answer": ["1", "2"]}), path)
    with pytest.raises(DataError, match="bad.parquet row 2: empty question"):
        load_problems(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="cannot read parquet file .*broken.parquet"):
        load_problems(str(path))


def test_save_load_round_trip(tmp_path):
    problems = [
        Problem("What is 1+2?", "3", solution="1+2=3", meta={"id": 0, "split": "train"}),
        Problem("Ünïcode? √4", "2", meta={"id": 1}),
        Problem("No meta", "-1"),
    ]
    path = tmp_path / "splits" / "train.jsonl"
    save_problems(problems, str(path))
    assert load_problems(str(path), solution_key="solution") == problems
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp file left behind


def test_save_problems_accepts_generator_and_overwrites(tmp_path):
    path = str(tmp_path / "out.jsonl")
    save_problems([Problem("old", "0")], path)
    save_problems((Problem(f"q{i}", str(i)) for i in range(3)), path)
    assert [p.question for p in load_problems(path)] == ["q0", "q1", "q2"]

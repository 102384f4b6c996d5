"""Problem files: one math problem per row of a `.jsonl` or `.parquet` file.

Every malformed row is reported with its place (`file:line` for jsonl, `file row N` for parquet, both
1-based) and the reason, so a bad dataset fails at load time rather than mid-run; callers that prefer to skip
such rows pass a `skipped` list, which collects them. A file with no problems is an error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from m2flow.io import atomic_write_text

SUFFIXES = (".jsonl", ".parquet")


@dataclass
class Problem:
    question: str  # the problem text shown to the model (before templating)
    answer: str  # ground-truth final answer, as a string
    solution: str | None = None  # a worked solution, when known
    meta: dict = field(default_factory=dict)  # the row's other fields (id, source, difficulty, ...)
    where: str = field(default="", compare=False)  # the row's place (`file:line`), for error reports


class DataError(ValueError):
    """A dataset file is missing, unsupported, empty or has a malformed row."""


class BadRowError(DataError):
    """One row of a dataset file is malformed (the message starts with its `file:line`)."""


def load_problems(path: str, prompt_key: str = "question", answer_key: str = "answer",
                  solution_key: str | None = None, skipped: list[str] | None = None) -> list[Problem]:
    """Read problems from `path`; the row's other fields go to `Problem.meta`. A malformed row raises
    BadRowError, or, when a `skipped` list is given, is skipped and its `file:line: reason` appended there.
    A file with no (valid) problems raises DataError."""
    path = os.fspath(path)
    if not path.endswith(SUFFIXES):
        raise DataError(f"unsupported dataset file {path}: expected one of {', '.join(SUFFIXES)}")
    if not os.path.isfile(path):
        raise DataError(f"dataset file not found: {path}")
    rows = read_rows(path)
    problems, bad = [], []
    for where, row in rows:
        try:
            if isinstance(row, BadRowError):
                raise row
            problems.append(_to_problem(row, where, prompt_key, answer_key, solution_key))
        except BadRowError as e:
            if skipped is None:
                raise
            bad.append(str(e))
    if skipped is not None:
        skipped.extend(bad)
    if not problems:
        detail = f"all {len(bad)} rows are malformed, e.g. {bad[0]}" if bad else "it is empty"
        raise DataError(f"dataset file {path} has no problems: {detail}")
    return problems


def save_problems(problems: Iterable[Problem], path: str) -> None:
    """Write problems as jsonl (atomically), readable with `load_problems(path, solution_key="solution")`."""
    lines = []
    for p in problems:
        row = {**p.meta, "question": p.question, "answer": p.answer}
        if p.solution is not None:
            row["solution"] = p.solution
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """`(place, row)` for every row of a `.jsonl` or `.parquet` file, place as in error reports (`file:line`,
    `file row N`); a jsonl line that is not valid JSON comes as a BadRowError in place of its row."""
    path = os.fspath(path)
    return _jsonl_rows(path) if path.endswith(".jsonl") else _parquet_rows(path)


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                row = BadRowError(f"{path}:{lineno}: invalid JSON ({e})")
            yield f"{path}:{lineno}", row


def _parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from e
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {i}", row


def _to_problem(row: Any, where: str, prompt_key: str, answer_key: str, solution_key: str | None) -> Problem:
    if not isinstance(row, dict):
        raise BadRowError(f"{where}: expected an object with fields, got {type(row).__name__}")
    for key in (prompt_key, answer_key):
        if key not in row:
            raise BadRowError(f"{where}: missing field '{key}' (row has: {', '.join(map(str, row)) or 'no fields'})")
    question = row[prompt_key]
    if not isinstance(question, str):
        raise BadRowError(f"{where}: field '{prompt_key}' must be a string, got {type(question).__name__}")
    if not question.strip():
        raise BadRowError(f"{where}: empty question in field '{prompt_key}'")
    answer = _answer_str(row[answer_key], where, answer_key)
    solution = row.get(solution_key) if solution_key else None
    if solution is not None and not isinstance(solution, str):
        raise BadRowError(f"{where}: field '{solution_key}' must be a string, got {type(solution).__name__}")
    meta = {k: v for k, v in row.items() if k not in (prompt_key, answer_key, solution_key)}
    return Problem(question=question, answer=answer, solution=solution, meta=meta, where=where)


def _answer_str(value: Any, where: str, key: str) -> str:
    """Answers are strings; numbers are accepted (12.0 -> '12')."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRowError(f"{where}: field '{key}' must be a string or number, got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRowError(f"{where}: field '{key}' is not a finite number: {value}")
        if value.is_integer():
            value = int(value)
    answer = str(value)
    if not answer.strip():
        raise BadRowError(f"{where}: empty answer in field '{key}'")
    return answer

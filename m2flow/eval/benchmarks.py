"""Benchmarks for `m2flow eval`: standard names mapped to the files users supply, and two built-in sets.

A file benchmark is ``<data-dir>/<file>.jsonl`` (or ``.parquet``, or ``.csv``, the form GPQA is distributed in),
one problem per row. Fields are looked up by the names the public copies use (`PROBLEM_FIELDS`,
`ANSWER_FIELDS`, ...: the first one a row has wins), so a file downloaded from the usual sources loads as is:

- math: the problem text, and the final answer (``answer``), or a worked solution whose last ``\\boxed{}`` is
  the answer (``solution``); an answer written as GSM8K writes it (``... #### 72``) is the part after ``####``;
- multiple choice: the question, and the choices as GPQA's ``Correct Answer`` + ``Incorrect Answer 1..3``, or a
  ``choices`` list (or ``A``..``D`` columns) with ``answer`` a letter, a 0-based index or the correct choice's
  text. The choices are shuffled with a fixed seed per problem (the benchmark's name and the problem's id) and
  lettered A, B, C, ...; the ground truth is the letter of the correct one. A row with no choices whose answer is
  a letter is taken as already formatted (its question lists the choices).

Every problem has an id (the row's ``id``-like field, else its 0-based row number), unique within its benchmark;
`m2flow eval` keys its per-sample results by it. Built-in sets need no files: ``synthetic_math`` is the
held-out split the demo evaluates on, ``synthetic_mc`` a GPQA-style set of arithmetic questions with four
shuffled choices. Both are generated deterministically.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from m2flow.data.datasets import BadRowError, DataError, Problem, read_rows
from m2flow.data.synthetic import TaskSpec, make_splits
from m2flow.rewards.math import extract_answer
from m2flow.rewards.multiple_choice import LETTERS, normalize_choice

MATH, MULTIPLE_CHOICE = "math", "multiple_choice"  # the kinds; also the names of their rewards in the registry
SUFFIXES = (".jsonl", ".parquet", ".csv")

# Field names, in order of preference (the public copies' spellings; see docs/eval.md).
PROBLEM_FIELDS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "expected_answer", "ground_truth")
SOLUTION_FIELDS = ("solution", "Solution")  # worked solutions: the answer is their last \boxed{}
ID_FIELDS = ("id", "unique_id", "problem_id", "problem_idx", "ID", "Record ID", "idx")
CHOICES_FIELDS = ("choices", "options", "Choices", "Options")  # a list of choice texts
CORRECT_FIELDS = ("Correct Answer", "correct_answer")  # GPQA: the correct choice's text ...
INCORRECT_FIELDS = ("incorrect_answers",)  # ... and the others, as one list, or as GPQA's numbered columns:
INCORRECT_COLUMNS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of your final choice (A, B, C, ...) "
                      "within \\boxed{}.")


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # the name on the command line
    title: str  # its column header in the table
    kind: str  # math (scored by math_reward) | multiple_choice (scored by multiple_choice_reward)
    file: str = ""  # the file's name in --data-dir without the suffix; "" = built in
    source: str = ""  # where the public copies are
    instruction: str = ""  # appended to every question (after the lettered choices), on its own paragraph
    builtin: Callable[[], list[Problem]] | None = None  # makes the problems of a built-in set


@dataclass
class Benchmark:
    spec: BenchmarkSpec
    problems: list[Problem]  # question: the whole user message; answer: the final answer or the letter; meta["id"]
    path: str = ""  # the file read ("" for a built-in set)


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Adds a benchmark to the registry; a name registered twice is an error."""
    if spec.name in BENCHMARKS and BENCHMARKS[spec.name] != spec:
        raise ValueError(f"benchmark {spec.name!r} is already registered")
    if spec.kind not in (MATH, MULTIPLE_CHOICE):
        raise ValueError(f"benchmark kind must be {MATH} or {MULTIPLE_CHOICE}, got {spec.kind!r}")
    BENCHMARKS[spec.name] = spec
    return spec


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registered benchmark `name`; an unknown name raises KeyError listing the valid ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}") from None


def load_benchmark(name: str, data_dir: str = "", num_problems: int = 0) -> Benchmark:
    """The problems of benchmark `name` (the first `num_problems` of them when > 0). A file benchmark reads
    `<data_dir>/<file>.{jsonl,parquet,csv}`; a missing file, or a row without the fields, raises DataError
    naming the file (and row) and the fields expected."""
    spec = get_benchmark(name)
    if spec.builtin is not None:
        problems, path = spec.builtin(), ""
    else:
        path = find_file(spec, data_dir)
        problems = _read_problems(spec, path)
    return Benchmark(spec, problems[:num_problems] if num_problems > 0 else problems, path)


def expected_fields(spec: BenchmarkSpec) -> str:
    """The fields a row of `spec`'s file needs, in words (for error messages and docs)."""
    problem = f"the problem ({' | '.join(PROBLEM_FIELDS)})"
    if spec.kind == MATH:
        return (f"{problem} and the final answer ({' | '.join(ANSWER_FIELDS)}; or a worked solution with a "
                f"\\boxed{{}} answer: {' | '.join(SOLUTION_FIELDS)})")
    return (f"{problem} and the choices: '{CORRECT_FIELDS[0]}' with '{INCORRECT_COLUMNS[0]}'..'3' (GPQA's CSV), "
            f"or {' | '.join(CHOICES_FIELDS)} (a list) or A, B, C, D columns with answer (a letter, a 0-based "
            f"index or the correct choice's text)")


def find_file(spec: BenchmarkSpec, data_dir: str) -> str:
    names = " or ".join(spec.file + s for s in SUFFIXES)
    hint = f"one problem per row with {expected_fields(spec)}; public copies: {spec.source} (see docs/eval.md)"
    if not data_dir:
        raise DataError(f"benchmark {spec.name!r} is read from a file: give --data-dir, a directory holding "
                        f"{names}: {hint}")
    for suffix in SUFFIXES:
        path = os.path.join(data_dir, spec.file + suffix)
        if os.path.isfile(path):
            return path
    raise DataError(f"benchmark {spec.name!r}: no {names} in {data_dir}; expected {hint}")


def _rows(path: str) -> Iterator[tuple[str, Any]]:
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                yield f"{path}:{i}", row
    else:
        yield from read_rows(path)


def _read_problems(spec: BenchmarkSpec, path: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(_rows(path)):
        if isinstance(row, BadRowError):
            raise row
        if not isinstance(row, dict):
            raise BadRowError(f"{where}: expected an object with fields, got {type(row).__name__}")
        problem_id = str(_first(row, ID_FIELDS, default=index))
        if problem_id in seen:
            raise BadRowError(f"{where}: problem id {problem_id!r} was already used at {seen[problem_id]}")
        seen[problem_id] = where
        question = _first(row, PROBLEM_FIELDS)
        if not isinstance(question, str) or not question.strip():
            raise BadRowError(f"{where}: no problem text; {spec.name} expects {expected_fields(spec)} (row has: "
                              f"{', '.join(map(str, row)) or 'no fields'})")
        if spec.kind == MATH:
            text, answer = question, _math_answer(row, where, spec)
        else:
            text, answer = _choice_question(row, question, where, spec, problem_id)
        if spec.instruction:
            text = f"{text}\n\n{spec.instruction}"
        meta = {**{k: v for k, v in row.items() if isinstance(v, (str, int, float, bool))}, "id": problem_id}
        problems.append(Problem(text, answer, meta=meta, where=where))
    if not problems:
        raise DataError(f"benchmark file {path} has no problems")
    return problems


def _first(row: dict, fields: tuple[str, ...], default: Any = None) -> Any:
    for field in fields:
        if row.get(field) is not None and row.get(field) != "":
            return row[field]
    return default


def _text(value: Any) -> str:
    """An answer or choice as text: numbers written plainly (12.0 -> '12')."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _math_answer(row: dict, where: str, spec: BenchmarkSpec) -> str:
    answer = _first(row, ANSWER_FIELDS)
    if answer is None:
        solution = _first(row, SOLUTION_FIELDS)
        answer = extract_answer(solution) if isinstance(solution, str) else None
        if answer is None:
            raise BadRowError(f"{where}: no answer; {spec.name} expects {expected_fields(spec)} (row has: "
                              f"{', '.join(map(str, row))})")
    answer = _text(answer)
    if "####" in answer:  # GSM8K: the worked solution, then '#### 72'
        answer = answer.rpartition("####")[2].strip()
    if not answer:
        raise BadRowError(f"{where}: empty answer")
    return answer


def _choice_question(row: dict, question: str, where: str, spec: BenchmarkSpec, problem_id: str) -> tuple[str, str]:
    """The question with its lettered, shuffled choices, and the correct letter."""
    correct = _first(row, CORRECT_FIELDS)
    if correct is not None:  # GPQA: the correct text and the incorrect ones
        wrong = _first(row, INCORRECT_FIELDS)
        if wrong is None:
            wrong = [row[c] for c in INCORRECT_COLUMNS if row.get(c) not in (None, "")]
        choices, answer_index = [correct, *wrong], 0
    else:
        choices = _first(row, CHOICES_FIELDS)
        if choices is None and "A" in row and "B" in row:  # A, B, C, D columns
            choices = [row[letter] for letter in LETTERS if row.get(letter) not in (None, "")]
        answer = _first(row, ANSWER_FIELDS)
        if choices is None:
            try:  # no choices given: the question lists them and the answer is their letter
                return question, normalize_choice(_text(answer))
            except ValueError:
                raise BadRowError(f"{where}: no choices; {spec.name} expects {expected_fields(spec)} (row has: "
                                  f"{', '.join(map(str, row))})") from None
        answer_index = _choice_index(answer, [_text(c) for c in choices], where)
    if not 2 <= len(choices) <= len(LETTERS):
        raise BadRowError(f"{where}: {len(choices)} choices; 2 to {len(LETTERS)} are supported")
    return format_choices(question, [_text(c) for c in choices], answer_index, f"{spec.name}/{problem_id}")


def _choice_index(answer: Any, choices: list[str], where: str) -> int:
    """Which choice `answer` names: a letter, a 0-based index, or the choice's text."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    text = _text(answer) if answer is not None else ""
    if text in choices:
        return choices.index(text)
    try:
        index = LETTERS.index(normalize_choice(text))
    except ValueError:
        index = -1
    if not 0 <= index < len(choices):
        raise BadRowError(f"{where}: answer {answer!r} is neither a letter, a 0-based index nor the text of one of "
                          f"the {len(choices)} choices")
    return index


def format_choices(question: str, choices: list[str], answer_index: int, key: str) -> tuple[str, str]:
    """``question`` followed by the choices shuffled by ``random.Random(key)`` (same key, same order) and
    lettered ``A) ...``, one a line; returns the text and the letter of ``choices[answer_index]``."""
    order = list(range(len(choices)))
    random.Random(key).shuffle(order)
    lines = [f"{LETTERS[i]}) {choices[j]}" for i, j in enumerate(order)]
    return f"{question}\n\n" + "\n".join(lines), LETTERS[order.index(answer_index)]


# ---- built-in sets ----------------------------------------------------------------------------------------

SYNTHETIC_MC_SIZE = 200
SYNTHETIC_MC_SEED = 11  # another stream than the demo's synthetic_seed (7)


def synthetic_math() -> list[Problem]:
    """The demo's held-out split: `make_splits` with the data config's defaults (the split `load_task` makes
    when no files are given; it is filled first, so it does not depend on the other splits' sizes)."""
    from m2flow.config import DataConfig

    d = DataConfig()
    spec = TaskSpec(max_operand=d.synthetic_max_operand, max_multiplier=d.synthetic_max_multiplier)
    problems = make_splits({"eval": d.synthetic_eval_size}, seed=d.synthetic_seed, spec=spec)["eval"]
    return [dataclasses.replace(p, meta={**p.meta, "id": str(i)}) for i, p in enumerate(problems)]


def synthetic_mc() -> list[Problem]:
    """GPQA-style arithmetic: a synthetic question, its answer and three distinct wrong values within 10 of it
    (never negative), shuffled and lettered; the answer is the letter."""
    base = make_splits({"mc": SYNTHETIC_MC_SIZE}, seed=SYNTHETIC_MC_SEED)["mc"]
    problems = []
    for i, p in enumerate(base):
        value = int(p.answer)
        rng = random.Random(f"synthetic_mc/{i}/distractors")
        wrong = rng.sample([v for v in range(max(value - 10, 0), value + 11) if v != value], 3)
        text, letter = format_choices(p.question, [str(value), *map(str, wrong)], 0, f"synthetic_mc/{i}")
        problems.append(Problem(f"{text}\n\n{CHOICE_INSTRUCTION}", letter,
                                meta={"id": str(i), "kind": p.meta["kind"], "value": p.answer}))
    return problems


for _spec in (
    BenchmarkSpec("aime24", "AIME 24", MATH, "aime24", "HuggingFaceH4/aime_2024 (problem, answer); "
                  "Maxwell-Jia/AIME_2024 (Problem, Answer); math-ai/aime24", MATH_INSTRUCTION),
    BenchmarkSpec("aime25", "AIME 25", MATH, "aime25", "math-ai/aime25 (problem, answer); opencompass/AIME2025 "
                  "(question, answer; parts I and II, concatenate them)", MATH_INSTRUCTION),
    BenchmarkSpec("gpqa_diamond", "GPQA-diamond", MULTIPLE_CHOICE, "gpqa_diamond",
                  "Idavidrein/gpqa, config gpqa_diamond (gated; gpqa_diamond.csv: Question, Correct Answer, "
                  "Incorrect Answer 1-3, Record ID); simple-evals' gpqa_diamond.csv has the same columns",
                  CHOICE_INSTRUCTION),
    BenchmarkSpec("math500", "MATH-500", MATH, "math500", "HuggingFaceH4/MATH-500 (problem, solution, answer, "
                  "unique_id)", MATH_INSTRUCTION),
    BenchmarkSpec("gsm8k", "GSM8K", MATH, "gsm8k", "openai/gsm8k, config main, split test (question, answer "
                  "ending in '#### N')", MATH_INSTRUCTION),
    BenchmarkSpec("amc23", "AMC 23", MATH, "amc23", "math-ai/amc23 (40 problems: question, answer)",
                  MATH_INSTRUCTION),
    BenchmarkSpec("synthetic_math", "synthetic math", MATH, source="built in: the demo's held-out split "
                  "(500 problems, no instruction added, as the demo prompts)", builtin=synthetic_math),
    BenchmarkSpec("synthetic_mc", "synthetic MC", MULTIPLE_CHOICE, source=f"built in: {SYNTHETIC_MC_SIZE} "
                  "arithmetic questions, four shuffled choices, a letter answer", builtin=synthetic_mc),
):
    register_benchmark(_spec)

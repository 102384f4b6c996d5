"""Synthetic math problems: determinism, disjoint splits, correct worked solutions, solution styles."""

from __future__ import annotations

import ast
import operator
import random
import re

import pytest

from m2flow.data.synthetic import OPENERS, TaskSpec, make_problem, make_splits
from m2flow.rewards import math_reward

STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
KINDS = {"arith2", "arith3", "arith4", "word"}


@pytest.fixture(scope="module")
def problems():
    return make_splits({"eval": 200, "train": 800}, seed=3)


def _all(splits):
    return [p for split in splits.values() for p in split]


def _eval_expression(expr: str) -> int:
    """Evaluates + - * and parentheses over non-negative integers (no eval())."""
    bin_ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in bin_ops:
            return bin_ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected node in {expr!r}: {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval").body)


def test_same_seed_same_splits_different_seed_different():
    sizes = {"eval": 30, "train": 70}
    a, b, c = make_splits(sizes, seed=1), make_splits(sizes, seed=1), make_splits(sizes, seed=2)
    assert a == b
    assert [p.question for p in _all(a)] != [p.question for p in _all(c)]


def test_split_depends_only_on_seed_and_earlier_sizes():
    small = make_splits({"eval": 20, "train": 10}, seed=5)
    large = make_splits({"eval": 20, "train": 40}, seed=5)
    assert small["eval"] == large["eval"]
    assert small["train"] == large["train"][:10]


def test_splits_have_requested_sizes_and_are_disjoint(problems):
    assert list(problems) == ["eval", "train"]
    assert len(problems["eval"]) == 200 and len(problems["train"]) == 800
    questions = [p.question for p in _all(problems)]
    assert len(set(questions)) == len(questions)  # unique within and across splits
    assert not {p.question for p in problems["eval"]} & {p.question for p in problems["train"]}


def test_worked_solutions_are_correct_and_chain(problems):
    for p in _all(problems):
        assert p.meta["solution_style"] == "worked"
        lines = p.solution.split("\n")
        assert lines[0] + "\n" in OPENERS, p.solution
        assert lines[-1] == f"\\boxed{{{p.answer}}}", p.solution
        steps = lines[1:-1]
        assert len(steps) == p.meta["steps"] >= 1
        previous = None
        for line in steps:
            m = STEP.match(line)
            assert m, f"malformed step {line!r} in {p.solution!r}"
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == r, line
            assert r >= 0
            if previous is not None:
                assert a == previous, f"step {line!r} does not continue from {previous}"
            previous = r
        assert previous == int(p.answer)
        assert int(p.answer) >= 0 and p.answer == str(int(p.answer))
        assert math_reward(p.solution, p.answer) == 1.0


def test_arithmetic_questions_evaluate_to_the_answer(problems):
    n = 0
    for p in _all(problems):
        if p.meta["kind"].startswith("arith"):
            m = re.fullmatch(r"Compute (.+)\.", p.question)
            assert m, p.question
            assert _eval_expression(m[1]) == int(p.answer), p.question
            assert p.meta["kind"] == f"arith{p.meta['steps'] + 1}"
            n += 1
    assert n > 500


def test_word_problems_mention_their_numbers(problems):
    words = [p for p in _all(problems) if p.meta["kind"] == "word"]
    assert words
    for p in words:
        numbers = {int(x) for x in re.findall(r"\d+", p.question)}
        first = STEP.match(p.solution.split("\n")[1])
        assert {int(first[1]), int(first[3])} <= numbers, (p.question, p.solution)


def test_all_kinds_appear(problems):
    assert {p.meta["kind"] for p in _all(problems)} == KINDS


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_direct_fraction_extremes(fraction):
    splits = make_splits({"a": 300}, seed=4, spec=TaskSpec(direct_fraction=fraction))
    for p in splits["a"]:
        if fraction == 1.0:
            assert p.meta["solution_style"] == "direct"
            assert p.solution == f"\\boxed{{{p.answer}}}"
        else:
            assert p.meta["solution_style"] == "worked"
            assert "=" in p.solution.split("\n")[1]
        assert math_reward(p.solution, p.answer) == 1.0


def test_openers_vary():
    splits = make_splits({"a": 400}, seed=5)
    openers = {p.solution.split("\n")[0] + "\n" for p in splits["a"]}
    assert openers == set(OPENERS)
    assert len({o[0] for o in OPENERS}) == len(OPENERS)  # each opener starts with its own first token


def test_direct_fraction_half():
    splits = make_splits({"a": 1000}, seed=6, spec=TaskSpec(direct_fraction=0.5))
    direct = [p for p in splits["a"] if p.meta["solution_style"] == "direct"]
    assert 420 <= len(direct) <= 580  # binomial(1000, 0.5): std ~16
    assert all(p.solution == f"\\boxed{{{p.answer}}}" for p in direct)
    assert all(p.solution.count("\n") >= 1 for p in splits["a"] if p not in direct)


def test_weights_select_kinds():
    only_word = make_splits({"a": 50}, seed=0, spec=TaskSpec(weights=(0, 0, 0, 1)))["a"]
    assert {p.meta["kind"] for p in only_word} == {"word"}
    only_two = make_splits({"a": 50}, seed=0, spec=TaskSpec(weights=(1, 0, 0, 0)))["a"]
    assert {p.meta["kind"] for p in only_two} == {"arith2"}


def test_make_problem_is_deterministic_by_rng():
    a = [make_problem(random.Random(9)) for _ in range(3)]
    b = [make_problem(random.Random(9)) for _ in range(3)]
    assert a == b


def test_too_small_task_space_raises():
    # operands 1..2, multiplier 2, two operands: fewer than a dozen distinct problems exist
    spec = TaskSpec(max_operand=2, max_multiplier=2, weights=(1, 0, 0, 0))
    assert len(make_splits({"a": 2}, seed=0, spec=spec)["a"]) == 2
    with pytest.raises(ValueError, match="too small"):
        make_splits({"a": 50}, seed=0, spec=spec)
    with pytest.raises(ValueError, match="'b'"):
        make_splits({"a": 2, "b": 50}, seed=0, spec=spec)  # the second split cannot be filled


def test_task_spec_validation():
    with pytest.raises(ValueError, match="max_operand"):
        TaskSpec(max_operand=1)
    with pytest.raises(ValueError, match="weights"):
        TaskSpec(weights=(0, 0, 0, 0))

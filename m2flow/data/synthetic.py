"""Synthetic math problems with worked solutions, graded by difficulty, deterministic by seed.

Kinds (the difficulty is the number of arithmetic steps):
- arithmetic with 2, 3 or 4 operands (+, -, and multiplication by a one-digit number);
- short word problems (buy / give away / boxes of items), one or two steps.

Every problem has a worked solution: an opening line (one of `OPENERS`), one step per line, and
`\\boxed{answer}`, the format the reward extracts. With `TaskSpec.direct_fraction` > 0, that share of
solutions is the bare `\\boxed{answer}` instead (the mixed demonstrations of the default experiment).
Intermediate results never go below zero. `make_splits` returns disjoint splits (no question text appears
in two of them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from m2flow.data.datasets import Problem

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia"]
# Worked solutions open in one of several ways, as written solutions do; a bare answer always looks the same.
OPENERS = ["Steps:\n", "Work:\n", "Let's compute:\n"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs", "marbles", "cups"]


@dataclass(frozen=True)
class TaskSpec:
    max_operand: int = 30  # operands of + and - are drawn from 1..max_operand
    max_multiplier: int = 9  # multiplications are by 2..max_multiplier
    weights: tuple[float, float, float, float] = (0.3, 0.4, 0.1, 0.2)  # 2-op, 3-op, 4-op, word problems
    direct_fraction: float = 0.0  # share of solutions that state only the final answer, with no worked steps

    def __post_init__(self) -> None:
        if self.max_operand < 2 or self.max_multiplier < 2:
            raise ValueError(f"TaskSpec needs max_operand >= 2 and max_multiplier >= 2, got {self}")
        if len(self.weights) != 4 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"TaskSpec.weights must be 4 non-negative numbers with a positive sum, got {self.weights}")


def _steps_text(steps: list[tuple[int, str, int, int]], answer: int) -> str:
    lines = [f"{a}{op}{b}={r}" for a, op, b, r in steps]
    return "\n".join(lines) + f"\n\\boxed{{{answer}}}"


def _arithmetic(rng: random.Random, spec: TaskSpec, n_operands: int) -> Problem:
    value = rng.randint(1, spec.max_operand)
    expr, steps = str(value), []
    for _ in range(n_operands - 1):
        op = rng.choices("+-*", weights=(0.45, 0.4, 0.15))[0]
        if op == "*" and value > 20:
            op = "-"
        if op == "-" and value < 2:
            op = "+"
        if op == "+":
            b = rng.randint(1, spec.max_operand)
            result = value + b
        elif op == "-":
            b = rng.randint(1, min(value, spec.max_operand))
            result = value - b
        else:
            b = rng.randint(2, spec.max_multiplier)
            result = value * b
        if op == "*" and expr != str(value):
            expr = f"({expr})"
        expr += f"{op}{b}"
        steps.append((value, op, b, result))
        value = result
    question = f"Compute {expr}."
    return Problem(question, str(value), _steps_text(steps, value), {"kind": f"arith{n_operands}", "steps": len(steps)})


def _word(rng: random.Random, spec: TaskSpec) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, spec.max_operand), rng.randint(1, spec.max_operand)
    form = rng.randrange(4)
    if form == 0:
        q = f"{name} has {a} {item} and buys {b} more. How many now?"
        steps = [(a, "+", b, a + b)]
    elif form == 1:
        b = rng.randint(1, a)
        q = f"{name} has {a} {item} and gives {b} away. How many are left?"
        steps = [(a, "-", b, a - b)]
    elif form == 2:
        c = rng.randint(1, a + b)
        q = f"{name} has {a} {item}, finds {b} more, then loses {c}. How many now?"
        steps = [(a, "+", b, a + b), (a + b, "-", c, a + b - c)]
    else:
        k = rng.randint(2, spec.max_multiplier)
        n = rng.randint(2, 12)
        q = f"{name} buys {k} boxes of {n} {item} and had {a}. How many in all?"
        steps = [(k, "*", n, k * n), (k * n, "+", a, k * n + a)]
    answer = steps[-1][3]
    return Problem(q, str(answer), _steps_text(steps, answer), {"kind": "word", "steps": len(steps)})


def make_problem(rng: random.Random, spec: TaskSpec = TaskSpec()) -> Problem:
    kind = rng.choices(range(4), weights=spec.weights)[0]
    problem = _word(rng, spec) if kind == 3 else _arithmetic(rng, spec, kind + 2)
    direct = rng.random() < spec.direct_fraction
    opener = rng.choice(OPENERS)
    if direct:
        problem.solution = f"\\boxed{{{problem.answer}}}"
    else:
        problem.solution = opener + problem.solution
    problem.meta["solution_style"] = "direct" if direct else "worked"
    return problem


def make_splits(
    sizes: dict[str, int], seed: int, spec: TaskSpec = TaskSpec(), split_specs: dict[str, TaskSpec] | None = None
) -> dict[str, list[Problem]]:
    """Disjoint splits of unique problems, e.g. `make_splits({"eval": 500, "sft": 2000, "rl": 50000}, seed=7)`.

    Splits are filled in the order given, from one stream of unique problems, so the problems of a split
    depend only on the seed and on the sizes (and specs) of the splits before it. `split_specs` gives some
    splits their own task mix (e.g. worked solutions only for the easier kinds).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for name, size in sizes.items():
        out: list[Problem] = []
        tries = 0
        split_spec = (split_specs or {}).get(name, spec)
        while len(out) < size:
            problem = make_problem(rng, split_spec)
            tries += 1
            if tries > 50 * size + 1000:
                raise ValueError(f"cannot draw {size} unique problems for split '{name}': the task space is too small")
            if problem.question in seen:
                continue
            seen.add(problem.question)
            out.append(problem)
        splits[name] = out
    return splits


def response_metrics(texts: list[str]) -> dict[str, float]:
    """The demo's measure of how a model answers: `worked_share`, the share of responses that show at least one
    worked step (a line containing '='), against bare boxed answers."""
    return {"worked_share": sum("=" in t for t in texts) / max(len(texts), 1)}

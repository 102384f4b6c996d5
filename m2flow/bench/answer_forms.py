"""Agreement of a reward function with hand-labelled answer forms.

    python -m m2flow.bench.answer_forms [FILE] [--reward NAME | --reward module:function]

FILE (default: tests/rewards/data/answer_forms.jsonl) holds one JSON object per line: ``response``,
``ground_truth``, ``label`` (1: the response's final answer is correct and must score 1.0; 0: it must not) and
``form`` (how the answer is written, e.g. ``thousands_comma``). A row agrees when ``reward(response,
ground_truth) >= 1.0`` equals ``label == 1``. The table gives agreement per form and overall; ``--show-misses``
lists the rows that disagree. ``--reward`` is a registered name (default ``math``) or ``module:function``, e.g. an
older copy of the reward to measure a change against.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

DEFAULT_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "rewards", "data", "answer_forms.jsonl")


@dataclass
class FormCase:
    response: str
    ground_truth: str
    label: int  # 1: must score 1.0; 0: must not
    form: str


@dataclass
class Agreement:
    agreed: int = 0
    total: int = 0
    misses: list[FormCase] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.agreed / self.total if self.total else 0.0


def load_cases(path: str) -> list[FormCase]:
    with open(path, encoding="utf-8") as f:
        return [FormCase(**json.loads(line)) for line in f if line.strip()]


def agreement(reward: Callable[[str, str], float], cases: list[FormCase]) -> dict[str, Agreement]:
    """Agreement per form, plus ``"overall"`` (the last key)."""
    by_form: dict[str, Agreement] = defaultdict(Agreement)
    overall = Agreement()
    for case in cases:
        ok = (reward(case.response, case.ground_truth) >= 1.0) == (case.label == 1)
        for a in (by_form[case.form], overall):
            a.total += 1
            a.agreed += ok
            if not ok:
                a.misses.append(case)
    return {**dict(sorted(by_form.items())), "overall": overall}


def resolve_reward(spec: str) -> Callable[..., float]:
    """A registered reward name, or ``module:function``."""
    if ":" in spec:
        module, name = spec.split(":", 1)
        return getattr(importlib.import_module(module), name)
    from m2flow.rewards import get_reward

    return get_reward(spec)


def format_table(results: dict[str, Agreement]) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'form':<{width}}  agree  total  rate"]
    for form, a in results.items():
        lines.append(f"{form:<{width}}  {a.agreed:>5}  {a.total:>5}  {100 * a.rate:5.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2flow.bench.answer_forms", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", default=os.path.normpath(DEFAULT_FILE), help="labelled cases (jsonl)")
    parser.add_argument("--reward", default="math", help="registered reward name or module:function")
    parser.add_argument("--show-misses", action="store_true", help="list the rows that disagree")
    args = parser.parse_args(argv)
    results = agreement(resolve_reward(args.reward), load_cases(args.file))
    print(format_table(results))
    if args.show_misses:
        for case in results["overall"].misses:
            print(f"miss [{case.form}] label={case.label}: {case.response!r} vs {case.ground_truth!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Answers as people and models write them: normalisation, brace-less boxes, and the hand-labelled set."""

from __future__ import annotations

import os
import time

import pytest

from m2flow.bench.answer_forms import agreement, format_table, load_cases, main
from m2flow.rewards import extract_answer, math_reward
from m2flow.rewards.math import answers_equivalent, normalize_answer

FORMS_FILE = os.path.join(os.path.dirname(__file__), "data", "answer_forms.jsonl")
CASES = load_cases(FORMS_FILE)


def test_labelled_set_is_large_and_covers_the_forms() -> None:
    assert len(CASES) >= 60
    forms = {c.form for c in CASES}
    assert {"trailing_punctuation", "thousands_comma", "thousands_latex", "thousands_space", "text_units",
            "degrees", "repeating_decimal", "bare_box", "dfrac", "left_right", "no_answer"} <= forms
    assert all(c.label in (0, 1) for c in CASES)
    for form in forms - {"no_answer", "lists"}:  # every form has a wrong answer next to its right ones
        assert {c.label for c in CASES if c.form == form} == {0, 1}, form


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c.form}" for i, c in enumerate(CASES)])
def test_reward_agrees_with_label(case) -> None:
    assert (math_reward(case.response, case.ground_truth) >= 1.0) == (case.label == 1), case


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("5.", "5"),
        ("x = 7;", "x = 7"),
        ("5!", "5!"),  # a factorial, not punctuation
        ("1,000", "1000"),
        ("-3,600.25", "-3600.25"),
        ("1{,}000", "1000"),
        (r"1\,000\,000", "1000000"),
        ("1\u2009000", "1000"),
        ("25\u202f000", "25000"),
        ("1 000", "1000"),
        ("1,2", "1,2"),  # a list of two numbers
        ("12,34", "12,34"),
        ("1,000,00", "1,000,00"),
        ("0,123", "0,123"),
        ("1 2", "1 2"),
        ("[1,100]", "[1,100]"),  # an interval: two numbers
        (r"\{1,000\}", r"\{1,000\}"),
        (r"5\text{ cm}", "5"),
        (r"\text{5 apples}", "5"),
        (r"5\ \text{cm}^2", "5"),
        (r"12\text{ square units}.", "12"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),  # no number left: a text answer stays as it is
        (r"3\text{ or }5", r"3\text{ or }5"),  # words between numbers are not units
        (r"x\text{ cm}", r"x\text{ cm}"),
        (r"\text{(C)}", r"\text{(C)}"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        ("30°", "30"),
        (r"30\degree", "30"),
        (r"0.\overline{3}", r"\frac{1}{3}"),
        (r"0.1\overline{6}", r"\frac{1}{6}"),
        (r"1.\overline{142857}", r"\frac{8}{7}"),
        (r"0.\overline{9}", "1"),
        (r"-.\overline{3}", r"-\frac{1}{3}"),
        (r"0.\dot{3}", r"\frac{1}{3}"),
        (r"0." + "1" * 70 + r"\overline{3}", r"0." + "1" * 70 + r"\overline{3}"),  # too long: left alone
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac34", r"\frac34"),
        (r"\left( 1, 2 \right)", "( 1, 2 )"),
        (r"\Bigl[0, 1\Bigr]", "[0, 1]"),
        (r"\rightarrow", r"\rightarrow"),  # another command, not \right
        ("$ 42 $", "42"),
    ],
)
def test_normalize_answer(answer: str, expected: str) -> None:
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed 5", "5"),
        (r"so \boxed5", "5"),
        (r"so $\boxed 42$.", "42"),
        (r"so \boxed 17.", "17."),  # the period goes in normalisation
        (r"so \boxed \frac{1}{2} is it", r"\frac{1}{2}"),
        (r"\boxed{4} then \boxed 5", "5"),  # the last box wins, braced or not
        (r"\boxed 5 then \boxed{4}", "4"),
        (r"\boxed{x = \boxed 5}", "5"),
        (r"\boxed{3} and we write \boxed", "3"),  # an empty brace-less box is no box
        (r"\boxedx 5", None),  # another command
        (r"\boxed {7}", "7"),
    ],
)
def test_brace_less_boxes(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_no_box_and_no_answer_phrase_scores_zero() -> None:
    for response in ["5", "It is 1,000.", r"So $x = 0.\overline{3}$", "We get 30°."]:
        assert math_reward(response, "5") == 0.0
        assert math_reward(response, "5", format_penalty=0.5) == -0.5


def test_answers_equivalent() -> None:
    assert answers_equivalent("1/2", "0.5")
    assert answers_equivalent(r"0.\overline{3}", r"\frac{1}{3}")
    assert answers_equivalent("1\u2009000", "1000")
    assert not answers_equivalent("1,2", "12")
    assert not answers_equivalent("", "0")


def test_normalisation_is_linear_on_pathological_answers() -> None:
    n = 100_000
    start = time.perf_counter()
    for text in ["1" * n, "1" + ",000" * n + ",00", "1,," * n, "1" + " 000" * n + " 0", "\\text{" * n + "}",
                 "5\\text{" + " cm" * n + "}", "0.\\overline{" * n, "\\boxed x" * n, "\\boxed " + "{" * n,
                 "5" + "}" * n, "\\left" * n]:
        normalize_answer(text)
        extract_answer(text)
    assert time.perf_counter() - start < 10  # ~1 s here; a quadratic step would take minutes


def test_bench_script(capsys) -> None:
    results = agreement(lambda r, g: 1.0, CASES)  # a reward that says yes to everything agrees with the 1 labels
    assert results["overall"].agreed == sum(c.label for c in CASES)
    assert format_table(results).splitlines()[-1].startswith("overall")
    assert main([FORMS_FILE, "--reward", "boxed_format"]) == 0
    assert "overall" in capsys.readouterr().out

"""Tests for m2flow.rewards.math: extraction, equivalence, fast path, threads, robustness."""

from __future__ import annotations

import threading
import time
from unittest import mock

import pytest

import m2flow.rewards.math as rmath
from m2flow.rewards import extract_answer, math_reward, score_responses


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),  # last box wins
        (r"\boxed{x = \boxed{5}}", "5"),  # nested: innermost (last opened) box
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{3} and then \boxed{4", "3"),  # unclosed trailing box ignored
        (r"\boxed{  -5 }", "-5"),
        ("The answer is 42.", "42"),
        ("Thus the ANSWER IS 3.5. Done.", "3.5"),
        ("answer: 1\nwait\nAnswer: $\\frac{2}{3}$.", r"\frac{2}{3}"),
        ("**Answer:** 17", "17"),
        ("I think it's 12 or so", None),  # no last-number fallback by default
        (r"\boxed{}", None),  # empty box is no answer
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_last_number_fallback_is_opt_in() -> None:
    text = "we get 3, then 1,250 and finally -7.5"
    assert extract_answer(text) is None
    assert extract_answer(text, last_number_fallback=True) == "-7.5"
    assert extract_answer(r"\boxed{9} then 3", last_number_fallback=True) == "9"


@pytest.mark.parametrize(
    "answer, truth",
    [
        ("0.75", "3/4"),
        (r"\frac{3}{4}", "0.75"),
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        ("3/4", r"\dfrac34"),
        ("- 5", "-5"),
        ("5.0", "5"),
        ("1,000", "1000"),
        (r"\sqrt{2}", "2^{1/2}"),
        ("1 + x", "x+1"),
        ("$0.5$", r"\frac{1}{2}"),
    ],
)
def test_equivalent_forms_score_one(answer: str, truth: str) -> None:
    assert math_reward(rf"The result is \boxed{{{answer}}}.", truth) == 1.0


@pytest.mark.parametrize(
    "response, truth",
    [
        (r"\boxed{41}", "42"),
        (r"\boxed{0.7}", "3/4"),
        (r"\boxed{\frac{3}{5}}", "0.75"),
        (r"\boxed{banana soup}", "7"),
        (r"\boxed{5} then I changed my mind \boxed{6}", "5"),  # last box wins, and it is wrong
    ],
)
def test_wrong_answers_score_zero(response: str, truth: str) -> None:
    assert math_reward(response, truth) == 0.0


@pytest.mark.parametrize("response", ["no answer here", r"\boxed{}", "%$#@!", ""])
def test_no_answer_gives_format_penalty(response: str) -> None:
    assert math_reward(response, "7") == 0.0
    assert math_reward(response, "7", format_penalty=0.5) == -0.5


def test_fallback_phrase_is_scored() -> None:
    assert math_reward("So the answer is 3/4.", "0.75") == 1.0
    assert math_reward("Answer: 12", "13") == 0.0


def test_integer_fast_path_skips_math_verify() -> None:
    with mock.patch.object(rmath, "parse", side_effect=AssertionError("math-verify called")):
        assert math_reward(r"\boxed{+42}", "42") == 1.0
        assert math_reward(r"\boxed{- 7}", "-7") == 1.0
        assert math_reward(r"\boxed{007}", "7") == 1.0
        assert math_reward(r"\boxed{-0}", "0") == 1.0
        assert math_reward(r"\boxed{8}", "-8") == 0.0
        assert math_reward(r"\boxed{" + "9" * 10000 + "}", "9" * 10000) == 1.0  # no int() limit


def test_errors_inside_verification_score_zero() -> None:
    with mock.patch.object(rmath, "verify", side_effect=RuntimeError("boom")):
        assert math_reward(r"\boxed{0.5}", r"\frac12") == 0.0


def test_non_main_thread_uses_no_signal_timeouts() -> None:
    results: dict[str, object] = {}

    def work() -> None:
        try:
            results["right"] = math_reward(r"\boxed{\dfrac{3}{4}}", "0.75")
            results["wrong"] = math_reward(r"\boxed{\dfrac{3}{5}}", "0.75")
        except BaseException as e:  # noqa: BLE001 - surface anything to the main thread
            results["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    assert results == {"right": 1.0, "wrong": 0.0}


def test_pathological_inputs_return_quickly() -> None:
    tower = r"\boxed{" + "9^{" * 12 + "9" + "}" * 12 + "}"  # sympy would evaluate ~forever
    garbage = r"\boxed{" * 5000 + "(" * 5000  # unbalanced: linear-time extraction, no answer
    start = time.perf_counter()
    assert math_reward(tower, "1", timeout_s=1) == 0.0
    assert math_reward(garbage, "1", format_penalty=1.0) == -1.0
    assert isinstance(math_reward(r"\boxed{" + "x+" * 3000 + "1}", "1", timeout_s=1), float)
    assert time.perf_counter() - start < 20


def test_score_responses() -> None:
    responses = [r"\boxed{2}", r"\boxed{0.5}", "nothing"]
    assert score_responses(responses, ["2", "1/2", "3"]) == [1.0, 1.0, 0.0]
    assert score_responses(responses, ["2", "1/2", "3"], format_penalty=1.0) == [1.0, 1.0, -1.0]
    with pytest.raises(ValueError):
        score_responses(responses, ["2"])

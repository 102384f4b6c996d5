"""Tests for m2flow.rewards.multiple_choice: letter extraction on a table of hand-written responses."""

from __future__ import annotations

import time

import pytest

from m2flow.rewards import extract_choice, get_reward, multiple_choice_reward, score_responses
from m2flow.rewards.multiple_choice import normalize_choice


@pytest.mark.parametrize(
    "response, expected",
    [
        # boxes
        (r"So the answer is \boxed{C}.", "C"),
        (r"\boxed{(C)}", "C"),
        (r"$\boxed{\text{C}}$", "C"),
        (r"$\boxed{\textbf{(D)}}$", "D"),
        (r"\boxed{c}", "C"),  # alone in a box: unambiguous in any case
        (r"\boxed{(b)}", "B"),
        (r"\boxed{C) 42}", "C"),  # the box starts with the choice label
        (r"\boxed{(J) none of the above}", "J"),
        (r"\boxed C", "C"),
        # phrases
        ("Answer: C", "C"),
        ("answer: c", "C"),  # the whole phrase is one letter
        ("The answer is (C).", "C"),
        ("The correct answer is **B**.", "B"),
        ("The answer is option D because the others fail.", "D"),
        ("The answer is choice (a).", "A"),
        ("Final Answer: E", "E"),
        ("the answer is I.", "I"),
        # the last parenthesised letter
        ("Only (C) satisfies both conditions.", "C"),
        ("It must be (c)", "C"),
        # no letter
        ("I am not sure.", None),
        ("The answer is a bit subtle, so let us think.", None),  # the article, not choice A
        ("The answer is I think unclear.", None),  # the pronoun, not choice I
        (r"\boxed{42}", None),
        (r"\boxed{A, C}", None),  # two letters: not one choice
        ("f(a) = 3 and g(b) = 4", None),  # function arguments, not choices
        ("(K) is not a choice", None),
        ("", None),
    ],
)
def test_extract_choice(response: str, expected: str | None) -> None:
    assert extract_choice(response) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        # several letters mentioned: the deliberate statement wins, then the last one
        ("(A) and (B) are wrong because of the sign, so the answer is (C).", "C"),
        ("The answer is C, not D.", "C"),
        ("Options (A), (B) fail; (D) works.", "D"),
        (r"\boxed{B}. Note that (A) and (C) fail.", "B"),  # a box beats later parentheses
        ("Answer: A. Wait, let me recheck. The answer is B.", "B"),  # the last phrase
        ("The answer is B.\nThen I checked (D) and (A) again.", "B"),  # a phrase beats later parentheses
        (r"First \boxed{A}, but on reflection \boxed{D}.", "D"),  # the last box
        (r"\boxed{42}, which is option (B).", "B"),  # a box with no letter: the next step decides
        ("The answer is a bit unclear; between (A) and (C) I pick (C).", "C"),
        ("The answer is I think (B).", "B"),
    ],
)
def test_several_letters(response: str, expected: str) -> None:
    assert extract_choice(response) == expected


def test_reward_scores() -> None:
    assert multiple_choice_reward(r"\boxed{C}", "C") == 1.0
    assert multiple_choice_reward(r"\boxed{C}", "(c)") == 1.0
    assert multiple_choice_reward("Answer: B", "C") == 0.0
    assert multiple_choice_reward("(A) and (B) fail, so the answer is (C).", "C") == 1.0
    assert multiple_choice_reward("(A) and (B) fail, so the answer is (C).", "A") == 0.0
    # no letter: the format penalty, as in math_reward
    assert multiple_choice_reward("no idea", "C") == 0.0
    assert multiple_choice_reward("no idea", "C", format_penalty=0.5) == -0.5
    assert multiple_choice_reward("Answer: B", "C", format_penalty=0.5) == 0.0


@pytest.mark.parametrize("truth, expected", [("C", "C"), ("c", "C"), (" (D) ", "D"), (r"\text{J}", "J")])
def test_normalize_choice(truth: str, expected: str) -> None:
    assert normalize_choice(truth) == expected


@pytest.mark.parametrize("truth", ["K", "42", "AB", ""])
def test_bad_ground_truth_raises(truth: str) -> None:
    with pytest.raises(ValueError, match="one letter A-J"):
        multiple_choice_reward(r"\boxed{A}", truth)


def test_registered_and_batched() -> None:
    fn = get_reward("multiple_choice")
    assert fn is multiple_choice_reward
    responses = [r"\boxed{A}", "Answer: B", "nothing"]
    assert score_responses(responses, ["A", "C", "D"], reward_fn=fn, format_penalty=1.0,
                           timeout_s=2.0) == [1.0, 0.0, -1.0]


def test_linear_on_pathological_responses() -> None:
    n = 100_000
    start = time.perf_counter()
    for text in ["(" * n, "(A" * n, "answer is " * n, r"\boxed{" * n, "(A) " * n, "answer: I " * n]:
        extract_choice(text)
    assert time.perf_counter() - start < 10  # well under a second here

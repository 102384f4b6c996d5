"""Tests for m2flow.eval.metrics against hand-computed values."""

from __future__ import annotations

from math import comb

import pytest

from m2flow.eval.metrics import avg_at_k, maj_at_k, pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 1, 0.4),  # pass@1 = c/n
        (4, 1, 1, 0.25),
        (3, 1, 2, 2 / 3),  # 1 - C(2,2)/C(3,2) = 1 - 1/3
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (8, 0, 4, 0.0),  # nothing correct
        (8, 8, 1, 1.0),  # everything correct
        (5, 2, 4, 1.0),  # n - c < k: every 4 of 5 contain a correct one
        (1000, 1, 1, 0.001),
    ],
)
def test_pass_at_k_hand_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_closed_form_on_small_cases() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable() -> None:
    # C(10000, 5000) has ~3000 digits (a float overflows); the product form stays in [0, 1]
    assert pass_at_k(10_000, 1, 5_000) == pytest.approx(0.5)
    assert 0.0 <= pass_at_k(10_000, 37, 64) <= 1.0


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k_is_the_mean_verdict() -> None:
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([1, 0, 0, 0, 0]) == 0.2
    assert avg_at_k([0.0] * 16) == 0.0
    verdicts = [True, False, False, True, True, False, True, True]
    assert avg_at_k(verdicts) == sum(verdicts) / len(verdicts) == 5 / 8
    with pytest.raises(ValueError):
        avg_at_k([])


def same(a: str, b: str) -> bool:
    return a == b


def test_maj_at_k_majority_and_ties() -> None:
    # "4" has 3 votes against "3" 2: the majority is wrong
    assert maj_at_k(["3", "4", "4", "3", "4"], [1, 0, 0, 1, 0], same) == 0.0
    # a 2-2 tie goes to the answer seen first ("3", correct), whichever order the rest come in
    assert maj_at_k(["3", "4", "4", "3"], [1, 0, 0, 1], same) == 1.0
    assert maj_at_k(["4", "3", "3", "4"], [0, 1, 1, 0], same) == 0.0
    # samples without an answer do not vote, even when they are the most frequent
    assert maj_at_k([None, None, None, "7"], [0, 0, 0, 1], same) == 1.0
    assert maj_at_k(["", "", "7", "8", "8"], [0, 0, 1, 0, 0], same) == 0.0
    assert maj_at_k([None, None], [0, 0], same) == 0.0
    assert maj_at_k([], [], same) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(["1"], [1, 0], same)


def test_maj_at_k_groups_equivalent_forms() -> None:
    # default equivalence (math-verify after normalisation): 1/2, 0.5 and \frac{1}{2} are one answer of 3 votes
    answers = ["1/3", "1/2", "0.5", "1/3", r"\frac{1}{2}"]
    verdicts = [0, 1, 1, 0, 1]
    assert maj_at_k(answers, verdicts) == 1.0
    assert maj_at_k(answers, verdicts, same) == 0.0  # by string equality "1/3" would win with 2 votes
    # thousands separators and degree signs are the same answer too
    assert maj_at_k(["1000", "999", "1,000", "999", "1\\,000"], [1, 0, 1, 0, 1]) == 1.0
    assert maj_at_k(["30^\\circ", "45", "30°", "45"], [1, 0, 1, 0]) == 1.0  # a 2-2 tie: 30 came first


def test_maj_at_k_calls_equivalence_once_per_new_text() -> None:
    calls: list[tuple[str, str]] = []

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return a == b

    assert maj_at_k(["2", "2", "2", "5", "5", "2"], [1, 1, 1, 0, 0, 1], counting) == 1.0
    assert calls == [("2", "5")]  # repeated texts reuse their group

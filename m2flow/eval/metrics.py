"""k-sample metrics for one problem: pass@k, avg@k and maj@k over its sampled answers.

Pure functions over plain lists (no model, no Ray). A benchmark's number is the mean of a metric over its
problems. With ``n`` samples of a problem, ``c`` of them correct:

- ``avg@k``: the mean verdict of the k samples (expected accuracy of one sample);
- ``pass@k``: the probability that at least one of k samples drawn without replacement from the n is correct,
  the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``;
- ``maj@k``: the verdict of the most frequent answer, answers grouped by mathematical equivalence (``1/2`` and
  ``0.5`` are one vote), ties broken by first occurrence.
"""

from __future__ import annotations

from typing import Callable, Sequence

Verdict = bool | float  # 1/True: the sample is correct; 0/False: it is not


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``, computed as
    ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no huge binomials, no cancellation). Needs ``0 <= c <= n`` and
    ``1 <= k <= n``."""
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    miss = 1.0  # probability that k draws are all wrong: C(n-c, k) / C(n, k)
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def avg_at_k(verdicts: Sequence[Verdict]) -> float:
    """Mean verdict of the k samples of one problem (1/True correct, 0/False wrong)."""
    if not verdicts:
        raise ValueError("avg@k of no samples")
    return sum(float(v) for v in verdicts) / len(verdicts)


def maj_at_k(answers: Sequence[str | None], verdicts: Sequence[Verdict],
             equivalent: Callable[[str, str], bool] | None = None) -> float:
    """The verdict of the majority answer among one problem's k samples.

    ``answers[i]`` is sample i's extracted answer (None or empty: no answer, no vote) and ``verdicts[i]`` whether
    it is correct. Answers are grouped by ``equivalent(a, b)`` (default: math-verify equivalence after
    normalisation, `m2flow.rewards.math.answers_equivalent`; identical strings are one group without a call),
    each answer joining the first group it is equivalent to. The largest group wins, a tie goes to the group whose
    first answer came first, and the result is the verdict of that first answer. No answers at all: 0.0.
    """
    if len(answers) != len(verdicts):
        raise ValueError(f"{len(answers)} answers but {len(verdicts)} verdicts")
    if equivalent is None:
        from m2flow.rewards.math import answers_equivalent as equivalent
    firsts: list[int] = []  # per group, the index of its first answer (groups in order of first occurrence)
    counts: list[int] = []
    group_of: dict[str, int] = {}  # answer text -> its group
    for i, answer in enumerate(answers):
        if not answer:
            continue
        g = group_of.get(answer)
        if g is None:
            g = next((j for j, first in enumerate(firsts) if equivalent(answers[first], answer)), None)
            if g is None:
                g = len(firsts)
                firsts.append(i)
                counts.append(0)
            group_of[answer] = g
        counts[g] += 1
    if not counts:
        return 0.0
    winner = counts.index(max(counts))  # the first group with the largest count
    return float(verdicts[firsts[winner]])

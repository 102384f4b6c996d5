"""Held-out accuracy: greedy (or sampled) generation, answers checked by the reward function."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from m2flow.data.datasets import Problem
from m2flow.rewards import math_reward
from m2flow.rollout.types import Sample, SamplingParams


@dataclass
class EvalResult:
    accuracy: float  # mean correctness over all samples (avg@n; greedy: accuracy)
    pass_at_n: float  # fraction of problems with at least one correct sample
    num_problems: int
    mean_response_tokens: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)  # the task's own response metrics (response_metrics)
    by_kind: dict[str, float] = field(default_factory=dict)  # accuracy per problem kind (meta["kind"])
    examples: list[dict] = field(default_factory=list)  # a few (question, response, answer, correct)


def evaluate(
    generate: Callable[[list[str], SamplingParams], list[Sample]],
    problems: list[Problem],
    prompts: list[str],
    params: SamplingParams,
    reward_fn: Callable[[str, str], float] = math_reward,
    num_examples: int = 4,
    score_batch: Callable[[list[str], list[str]], list[float]] | None = None,
    response_metrics: Callable[[list[str]], dict[str, float]] | None = None,
) -> EvalResult:
    """`generate(prompts, params)` returns params.n samples per prompt, prompt-major. `score_batch(responses,
    truths)`, when given, scores them instead of `reward_fn` one by one (the runner passes its training scorer,
    so evaluation has the same reward options and time limit). `response_metrics(texts)`, when given, adds a
    task's own measures of the responses (the demo's share of worked answers) to `extra`."""
    samples = generate(prompts, params)
    truths = [problems[s.prompt_index].answer for s in samples]
    if score_batch is None:
        score_batch = lambda rs, ts: [reward_fn(r, t) for r, t in zip(rs, ts)]  # noqa: E731
    correct = [score >= 1.0 for score in score_batch([s.text for s in samples], truths)]
    per_problem: dict[int, list[bool]] = defaultdict(list)
    for s, ok in zip(samples, correct):
        per_problem[s.prompt_index].append(ok)
    kinds: dict[str, list[bool]] = defaultdict(list)
    for i, oks in per_problem.items():
        kinds[problems[i].meta.get("kind", "all")].extend(oks)
    examples = [
        {"question": problems[s.prompt_index].question, "response": s.text,
         "answer": problems[s.prompt_index].answer, "correct": ok}
        for s, ok in list(zip(samples, correct))[:num_examples]
    ]
    return EvalResult(
        accuracy=sum(correct) / max(len(correct), 1),
        pass_at_n=sum(any(v) for v in per_problem.values()) / max(len(per_problem), 1),
        num_problems=len(problems),
        mean_response_tokens=sum(len(s.token_ids) for s in samples) / max(len(samples), 1),
        extra=response_metrics([s.text for s in samples]) if response_metrics else {},
        by_kind={k: sum(v) / len(v) for k, v in sorted(kinds.items())},
        examples=examples,
    )

"""`m2flow eval`'s benchmarks inside a training run (eval.benchmarks): at every evaluation point the policy,
through the run's own rollout engine, answers each benchmark's problems with eval.k samples; the samples go to
<run_dir>/eval/step_NNNNNN/results.jsonl (as `m2flow eval` writes them) and avg@k, pass@k and maj@k become
metrics `eval/<benchmark>/avg@k`, ... A resumed run re-evaluating a step finds its scored problems there."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from m2flow.eval.benchmarks import Benchmark
from m2flow.eval.run import Protocol, Results, _equivalent, evaluate_benchmark
from m2flow.eval.table import summarize

POLICY = "policy"  # the model name in results.jsonl


@dataclass
class GenerateOnly:
    """What evaluate_benchmark needs of an engine, over a generate function (e.g. the run's rollout worker)."""

    generate: Callable  # (prompts, SamplingParams) -> list[Sample]
    tokenizer: object
    max_model_len: int


def benchmark_metrics(engine: GenerateOnly, benchmarks: list[Benchmark], protocol: Protocol,
                      out_dir: str) -> dict[str, dict[str, float]]:
    """{benchmark: {"avg@k": .., "pass@k": .., "maj@k": ..}} for the current policy; samples in
    out_dir/results.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    results = Results(os.path.join(out_dir, "results.jsonl"))
    out = {}
    for b in benchmarks:
        evaluate_benchmark(engine, POLICY, b, protocol, results, progress=False)
        rows = {p.meta["id"]: [r for r in results.samples(POLICY, b.spec.name, p.meta["id"]) if r["sample"] < protocol.k]
                for p in b.problems}
        cell = summarize(rows, protocol.k, _equivalent(b.spec.kind))
        k = protocol.k
        out[b.spec.name] = {f"avg@{k}": cell.avg, f"pass@{k}": cell.pass_k, f"maj@{k}": cell.maj}
    return out

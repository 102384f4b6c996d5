"""The results table of `m2flow eval`: per-sample verdicts -> per (model, benchmark) metrics -> the table in the
published format (model rows, benchmark columns, an average column; cells avg@k in percent, 2 decimals).

Pure functions over the rows of results.jsonl (dicts with `problem_id`, `sample`, `answer`, `correct`, ...):
no model, no files except where a function says it writes one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from m2flow.eval.metrics import avg_at_k, maj_at_k, pass_at_k

METRICS = {"avg": "avg@k", "pass": "pass@k", "maj": "maj@k"}  # Cell field -> what the column shows


@dataclass
class Cell:
    """One model on one benchmark: the means over its problems (fractions, 0..1)."""

    avg: float  # avg@k: mean over problems of the mean verdict of its k samples
    pass_k: float  # pass@k, the unbiased estimator with n = k (a problem counts when any sample is correct)
    maj: float  # maj@k: the verdict of the majority answer (equivalent answers are one vote)
    problems: int
    samples: int
    pass_at: dict[int, float] = field(default_factory=dict)  # pass@j for j = 1, 2, 4, ... up to k (unbiased)
    response_tokens: float = 0.0  # mean response length
    truncated: float = 0.0  # share of samples cut at the length limit (finish_reason "length")


def summarize(rows_by_problem: dict[str, Sequence[dict]], k: int,
              equivalent: Callable[[str, str], bool] | None = None) -> Cell:
    """The metrics over problems, each with exactly `k` rows (its samples). `equivalent` groups answers for
    maj@k (None: math-verify equivalence; multiple choice passes string equality)."""
    if not rows_by_problem:
        raise ValueError("no problems to summarize")
    js = sorted({j for j in (1 << i for i in range(k.bit_length())) if j <= k} | {k})
    avg, maj, passes = [], [], {j: [] for j in js}
    tokens = truncated = samples = 0
    for problem_id, rows in rows_by_problem.items():
        if len(rows) != k:
            raise ValueError(f"problem {problem_id!r} has {len(rows)} samples, expected {k}")
        rows = sorted(rows, key=lambda r: r["sample"])
        verdicts = [bool(r["correct"]) for r in rows]
        avg.append(avg_at_k(verdicts))
        maj.append(maj_at_k([r.get("answer") for r in rows], verdicts, equivalent))
        for j in js:
            passes[j].append(pass_at_k(k, sum(verdicts), j))
        tokens += sum(r.get("response_tokens", 0) for r in rows)
        truncated += sum(r.get("finish_reason") == "length" for r in rows)
        samples += len(rows)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Cell(avg=mean(avg), pass_k=mean(passes[k]), maj=mean(maj), problems=len(avg), samples=samples,
                pass_at={j: mean(v) for j, v in passes.items()}, response_tokens=tokens / samples,
                truncated=truncated / samples)


@dataclass
class ResultTable:
    k: int
    models: list[str]  # row labels, in order
    benchmarks: list[tuple[str, str]]  # (name, column title), in order
    cells: dict[tuple[str, str], Cell]  # (model, benchmark name) -> its metrics
    protocol: dict = field(default_factory=dict)  # how the samples were drawn (written into table.json)
    model_paths: dict[str, str] = field(default_factory=dict)

    def value(self, model: str, benchmark: str, metric: str = "avg") -> float:
        cell = self.cells[(model, benchmark)]
        return cell.pass_k if metric == "pass" else getattr(cell, metric)

    def average(self, model: str, metric: str = "avg") -> float:
        """The unweighted mean over the benchmarks (the published tables' Average column)."""
        values = [self.value(model, name, metric) for name, _ in self.benchmarks]
        return sum(values) / len(values)

    def rows(self, metric: str = "avg") -> list[list[str]]:
        """Header, then one row per model: cells in percent with 2 decimals."""
        header = ["Model", *(title for _, title in self.benchmarks), "Average"]
        body = [[model, *(f"{100 * self.value(model, name, metric):.2f}" for name, _ in self.benchmarks),
                 f"{100 * self.average(model, metric):.2f}"] for model in self.models]
        return [header, *body]

    def markdown(self, metric: str = "avg") -> str:
        header, *body = self.rows(metric)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])

    def caption(self, metric: str = "avg") -> str:
        p = self.protocol
        how = ("greedy" if p.get("temperature") == 0 else
               f"temperature {p.get('temperature')}, top-p {p.get('top_p')}") if p else ""
        return (f"{METRICS[metric].replace('k', str(self.k))} (%), {self.k} sample(s) per problem"
                + (f", {how}, up to {p.get('max_new_tokens')} new tokens" if p else ""))

    def csv(self, metric: str = "avg") -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(self.rows(metric))
        return out.getvalue()

    def to_json(self) -> dict:
        return {
            "k": self.k,
            "protocol": self.protocol,
            "models": {m: self.model_paths.get(m, "") for m in self.models},
            "benchmarks": {name: title for name, title in self.benchmarks},
            "table": {metric: {m: {**{name: self.value(m, name, metric) for name, _ in self.benchmarks},
                                   "average": self.average(m, metric)} for m in self.models}
                      for metric in METRICS},
            "cells": {m: {name: asdict(self.cells[(m, name)]) for name, _ in self.benchmarks} for m in self.models},
        }


def write_table(table: ResultTable, out_dir: str) -> list[str]:
    """table.csv (the avg@k table), table.md (avg@k, pass@k, maj@k), table.json (everything) and table.png (bars
    of avg@k per benchmark and model) in `out_dir`; returns their paths."""
    from m2flow.io import atomic_write_text

    paths = [os.path.join(out_dir, name) for name in ("table.csv", "table.md", "table.json", "table.png")]
    atomic_write_text(paths[0], table.csv())
    atomic_write_text(paths[1], "\n\n".join(f"{table.caption(m)}\n\n{table.markdown(m)}" for m in METRICS) + "\n")
    atomic_write_text(paths[2], json.dumps(table.to_json(), indent=2) + "\n")
    plot_table(table, paths[3])
    return paths


def plot_table(table: ResultTable, path: str) -> None:
    """Grouped bars: one group per benchmark (and the average), one bar per model, avg@k in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [title for _, title in table.benchmarks] + ["Average"]
    width = 0.8 / len(table.models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) * max(1, len(table.models)) ** 0.5), 4.0))
    for i, model in enumerate(table.models):
        values = [100 * table.value(model, name) for name, _ in table.benchmarks] + [100 * table.average(model)]
        xs = [g + (i - (len(table.models) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(f"avg@{table.k} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(table.caption(), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The results table: per-sample rows -> per (model, benchmark) metrics -> the published table format."""

from __future__ import annotations

import json

import pytest

from m2flow.eval.table import Cell, ResultTable, summarize, write_table


def rows(answers, verdicts, finish=None):
    return [{"sample": j, "answer": a, "correct": c, "response_tokens": 10 + j,
             "finish_reason": (finish or ["stop"] * len(answers))[j]} for j, (a, c) in enumerate(zip(answers, verdicts))]


def test_summarize_against_hand_computed_values() -> None:
    by_problem = {
        # truth 1/2: "0.5" and "1/2" are one vote (2) against "3" (2): a tie, the first group (correct) wins
        "p1": rows(["0.5", "3", "1/2", "3"], [True, False, True, False]),
        # truth 8: "7" twice outvotes the one correct "8"; a sample with no answer does not vote
        "p2": rows(["7", "7", "8", None], [False, False, True, False], ["stop", "stop", "stop", "length"]),
    }
    cell = summarize(by_problem, k=4)
    assert cell.avg == pytest.approx((2 / 4 + 1 / 4) / 2)  # mean of per-problem means = 0.375
    assert cell.pass_k == 1.0  # each problem has a correct sample
    assert cell.maj == 0.5
    assert cell.pass_at == pytest.approx({1: 0.375,  # pass@1 = c/n, averaged
                                          2: ((1 - 1 / 6) + (1 - 3 / 6)) / 2,  # 1 - C(n-c,2)/C(4,2)
                                          4: 1.0})
    assert (cell.problems, cell.samples) == (2, 8)
    assert cell.response_tokens == 11.5 and cell.truncated == 1 / 8


def test_summarize_orders_samples_and_refuses_a_wrong_count() -> None:
    shuffled = list(reversed(rows(["1", "2", "2"], [True, False, False])))
    assert summarize({"p": shuffled}, k=3).maj == 0.0  # "2" wins 2-1 whatever the row order
    assert summarize({"p": rows(["A", "a"], [False, True])}, k=2, equivalent=lambda a, b: a == b).maj == 0.0
    with pytest.raises(ValueError, match="problem 'p' has 2 samples, expected 3"):
        summarize({"p": rows(["1", "2"], [True, False])}, k=3)


def published_table() -> ResultTable:
    """RLinf-math-1.5B's published avg@k numbers (issue 16): the average column is their plain mean."""
    benchmarks = [("aime24", "AIME 24"), ("aime25", "AIME 25"), ("gpqa_diamond", "GPQA-diamond")]
    values = {"base": (0.2865, 0.2292, 0.2910), "rl": (0.4844, 0.3563, 0.3846)}
    cells = {(m, name): Cell(avg=v, pass_k=min(1.0, 2 * v), maj=v - 0.1, problems=30, samples=480)
             for m, vs in values.items() for (name, _), v in zip(benchmarks, vs)}
    return ResultTable(16, ["base", "rl"], benchmarks, cells,
                       {"k": 16, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768})


def test_the_published_format() -> None:
    table = published_table()
    assert table.markdown() == (
        "| Model | AIME 24 | AIME 25 | GPQA-diamond | Average |\n"
        "|---|---:|---:|---:|---:|\n"
        "| base | 28.65 | 22.92 | 29.10 | 26.89 |\n"
        "| rl | 48.44 | 35.63 | 38.46 | 40.84 |")
    assert table.csv() == ("Model,AIME 24,AIME 25,GPQA-diamond,Average\n"
                           "base,28.65,22.92,29.10,26.89\nrl,48.44,35.63,38.46,40.84\n")
    assert table.markdown("maj").splitlines()[3] == "| rl | 38.44 | 25.63 | 28.46 | 30.84 |"
    assert table.caption() == "avg@16 (%), 16 sample(s) per problem, temperature 0.6, top-p 0.95, up to 32768 new tokens"
    assert table.caption("pass").startswith("pass@16 (%)")


def test_write_table_files(tmp_path) -> None:
    paths = write_table(published_table(), str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["table.csv", "table.md", "table.json", "table.png"]
    data = json.loads((tmp_path / "table.json").read_text())
    assert data["table"]["avg"]["rl"]["average"] == pytest.approx((0.4844 + 0.3563 + 0.3846) / 3)
    assert data["cells"]["base"]["aime24"]["samples"] == 480 and data["benchmarks"]["aime24"] == "AIME 24"
    assert (tmp_path / "table.md").read_text().count("| rl |") == 3  # avg@k, pass@k, maj@k
    assert (tmp_path / "table.png").read_bytes()[:4] == b"\x89PNG"

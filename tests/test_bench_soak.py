"""The soak benchmark's measurements and report (the long run itself is a command: m2flow bench soak)."""

from __future__ import annotations

import os
import subprocess

from m2flow.bench.soak import format_report, process_sample, sample_tree, summarize


def _samples(rss_per_step: float, steps: int = 100) -> list[dict]:
    return [{"t": float(s), "step": s, "rss_mb": 1000 + rss_per_step * s, "fds": 50, "processes": 10 + (s > 90),
             "rss_mb_by_name": {}} for s in range(steps + 1)]


def test_summary_reports_points_and_growth():
    result = summarize(_samples(0.5), steps=100)
    points = result["points"]
    assert [p["step"] for p in points.values()] == [25, 50, 100]
    # the median sample of the window [15, 25] is step 20; of [90, 100], step 95
    assert points["25%"]["rss_mb"] == 1010.0 and points["100%"]["rss_mb"] == 1047.5
    assert points["100%"]["processes"] == 11 and points["25%"]["processes"] == 10
    growth = result["growth_per_100_steps"]
    assert growth["rss_mb"] == (1047.5 - 1010.0) * 100 / 75 and growth["fds"] == 0.0
    table = format_report({"summary": result})
    assert "| 100% | 100 | 1048 | 50 | 11 |" in table and "RSS +50.0 MB" in table


def test_flat_run_has_no_growth():
    growth = summarize(_samples(0.0), steps=100)["growth_per_100_steps"]
    assert growth["rss_mb"] == 0.0


def test_sample_tree_counts_this_process_and_its_children():
    me = process_sample(os.getpid())
    assert me["rss"] > 10 * 2**20 and me["fds"] >= 3
    child = subprocess.Popen(["sleep", "60"])
    try:
        tree = sample_tree(os.getpid())
        assert tree["processes"] >= 2 and tree["rss_mb_by_name"]["sleep"] > 0
        assert tree["rss_mb"] >= tree["rss_mb_by_name"]["driver"] + tree["rss_mb_by_name"]["sleep"] - 1e-6
    finally:
        child.kill()
        child.wait()

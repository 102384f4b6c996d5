"""The timeline's recorder (m2flow/timeline.py): spans with their rank's memory, a step's peak memory per role,
and the JSONL file a run keeps (appended per step, cut back on resume)."""

from __future__ import annotations

import pytest
import torch

from m2flow.timeline import Recorder, Span, append_spans, drop_spans_after, load_spans, memory, memory_metrics


def test_a_span_records_its_ranks_resident_memory():
    rec = Recorder("actor", rank=1, devices="1")
    with rec.span("small"):
        pass
    with rec.span("large", rows=3):
        held = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched: resident
    small, large = rec.drain()
    assert (small.role, small.rank, small.devices, small.stage) == ("actor", 1, "1", "small")
    assert large.info["rows"] == 3 and large.end >= large.start >= small.end
    assert small.info["rss_gb"] > 0
    assert large.info["rss_gb"] - small.info["rss_gb"] > 0.2  # the 0.25 GiB it holds
    assert "device_gb" not in large.info  # no GPU in use
    assert rec.drain() == []
    del held


def test_memory_metrics_are_each_roles_peak():
    def span(role, rank, rss):
        return Span(role, rank, "0", "update", 0.0, 1.0, info={"rss_gb": rss})

    spans = [span("actor", 0, 1.5), span("actor", 1, 2.0), span("rollout", 0, 0.7), span("driver", 0, 9.0),
             Span("rollout", 0, "0", "group", 0.5, 0.5)]  # a mark without memory
    assert memory_metrics(spans) == {"memory/actor_rss_gb": 2.0, "memory/rollout_rss_gb": 0.7}
    assert memory()["rss_gb"] > 0


def test_spans_file_appends_steps_and_drops_later_ones(tmp_path):
    path = str(tmp_path / "timeline.jsonl")
    for step in (1, 2, 3):
        append_spans(path, step, [Span("actor", 0, "0", "update", float(step), step + 0.5, info={"rows": step})])
    assert [(s.step, s.info["rows"]) for s in load_spans(path)] == [(1, 1), (2, 2), (3, 3)]
    drop_spans_after(path, 1)  # a run resumed from its step-1 checkpoint redoes steps 2 and 3
    assert [s.step for s in load_spans(path)] == [1]


def test_a_line_cut_short_is_dropped_and_a_resume_rewrites_the_file_without_it(tmp_path):
    path = tmp_path / "timeline.jsonl"
    append_spans(str(path), 1, [Span("actor", 0, "0", "update", 1.0, 2.0)])
    append_spans(str(path), 2, [Span("actor", 0, "0", "update", 3.0, 4.0)])
    with open(path, "a") as f:
        f.write('{"role": "actor", "rank": 0, "dev')  # a run killed while appending step 3
    assert [s.step for s in load_spans(str(path))] == [1, 2]
    drop_spans_after(str(path), 2)
    assert path.read_text().endswith("\n") and [s.step for s in load_spans(str(path))] == [1, 2]
    path.write_text('{"role": "actor"\n' + path.read_text())  # a broken line that is not the last: an error
    with pytest.raises(ValueError, match=r"timeline.jsonl:1: not a timeline span"):
        load_spans(str(path))

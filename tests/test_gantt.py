"""m2flow/gantt.py and `m2flow report`: busy time as a union per device, the bubble fraction on hand-built
iterations, the default step, the PNG and the errors."""

from __future__ import annotations

import json
import math

import pytest

from m2flow.cli import main
from m2flow.gantt import bubble_fraction, iteration_spans, pick_step, report, union_length
from m2flow.scheduler.devices import parse_devices
from m2flow.timeline import Span, append_spans


def span(role, rank, devices, stage, start, end, step=2):
    return Span(role, rank, devices, stage, start, end, step=step)


def two_devices(step=2, t0=0.0):
    """Device 0 busy 0-10 s (two overlapping stages of a collocated rollout and actor), device 1 busy 2-4 and
    6-10 s; a group mark and a driver span that must not count."""
    return [
        span("rollout", 0, "0", "generate", t0 + 0, t0 + 6, step),
        span("actor", 0, "0", "logprobs", t0 + 5, t0 + 8, step),
        span("actor", 0, "0", "update", t0 + 8, t0 + 10, step),
        span("rollout", 0, "0", "group", t0 + 3, t0 + 3, step),
        span("reference", 0, "1", "logprobs", t0 + 2, t0 + 4, step),
        span("critic", 0, "1", "values", t0 + 6, t0 + 9, step),
        span("critic", 0, "1", "update", t0 + 7, t0 + 10, step),
        span("driver", 0, "", "weight_sync", t0 + 4, t0 + 6, step),
    ]


def test_parse_devices():
    assert parse_devices("1") == [1]
    assert parse_devices("0-1") == [0, 1]
    assert parse_devices("0-2,5") == [0, 1, 2, 5]
    assert parse_devices("") == []


def test_union_counts_overlap_once():
    assert union_length([(0, 6), (5, 8), (8, 10)]) == 10
    assert union_length([(2, 4), (6, 9), (7, 10)]) == 2 + 4  # 6-9 and 7-10 overlap: 6-10
    assert union_length([(0, 1), (1, 2)]) == 2  # touching intervals
    assert union_length([]) == 0


def test_bubble_fraction_two_devices():
    b = bubble_fraction(two_devices())
    assert b["window_s"] == 10
    assert b["busy_s"] == {0: 10, 1: 6}
    assert b["bubble_fraction"] == pytest.approx(4 / 20)


def test_span_over_two_devices_counts_on_both():
    spans = [span("actor", 0, "0-1", "update", 0, 4), span("rollout", 0, "2", "generate", 0, 8)]
    b = bubble_fraction(spans)
    assert b["busy_s"] == {0: 4, 1: 4, 2: 8}
    assert b["bubble_fraction"] == pytest.approx((4 + 4 + 0) / 24)


def test_instant_marks_and_driver_do_not_count():
    spans = [span("rollout", 0, "0", "generate", 0, 2), span("rollout", 0, "0", "group", 5, 5),
             span("driver", 0, "", "weight_sync", 2, 4), span("reward", 0, "1", "group", 1, 1)]
    b = bubble_fraction(spans)
    # the window runs to the last mark (5 s); device 1 has only a mark: on the chart, never busy
    assert b["window_s"] == 5
    assert b["busy_s"] == {0: 2, 1: 0}
    assert b["bubble_fraction"] == pytest.approx((3 + 5) / 10)
    assert math.isnan(bubble_fraction([span("driver", 0, "", "sync", 0, 1)])["bubble_fraction"])


def test_pick_step_and_iteration_spans():
    spans = [s for step in (1, 2, 3, 4, 5) for s in two_devices(step, t0=100.0 * step)]
    assert pick_step(spans) == 4  # 2, 3, 4, 5 without step 1: the upper median
    assert pick_step([s for s in spans if s.step <= 3]) == 3  # 2, 3
    assert pick_step([s for s in spans if s.step <= 2]) == 2  # 2 steps: step 1 stays, upper median
    assert pick_step([s for s in spans if s.step == 1]) == 1
    assert pick_step([s for s in spans if s.step in (1, 2, 3, 4)]) == 3  # 2, 3, 4
    one = iteration_spans(spans, 4)
    assert {s.step for s in one} == {4} and len(one) == 8
    assert [s.start for s in one] == sorted(s.start for s in one)
    assert bubble_fraction(one)["bubble_fraction"] == pytest.approx(0.2)


def write_timeline(run_dir, steps=(1, 2, 3)):
    for step in steps:
        append_spans(str(run_dir / "timeline.jsonl"), step, two_devices(step, t0=1764570000.0 + 20 * step))


def test_report_writes_png(tmp_path):
    write_timeline(tmp_path)
    result = report(str(tmp_path))
    assert result["step"] == 3  # 1, 2, 3: step 1 left out, upper median of 2, 3
    assert result["busy_s"] == {0: pytest.approx(10), 1: pytest.approx(6)}
    assert result["bubble_fraction"] == pytest.approx(0.2)
    png = tmp_path / "timeline.png"
    assert result["png"] == str(png)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert report(str(tmp_path), step=1)["step"] == 1


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="timeline.jsonl: no such file"):
        report(str(tmp_path))
    (tmp_path / "timeline.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="timeline.jsonl is empty"):
        report(str(tmp_path))
    (tmp_path / "timeline.jsonl").unlink()
    write_timeline(tmp_path)
    with pytest.raises(ValueError, match=r"timeline.jsonl has no step 7 \(it holds steps 1-3"):
        report(str(tmp_path), step=7)


def test_report_drops_a_last_line_cut_short(tmp_path):
    write_timeline(tmp_path, steps=(1, 2))
    row = json.dumps(span("actor", 0, "0", "update", 0, 1, step=3).to_json())
    with open(tmp_path / "timeline.jsonl", "a") as f:
        f.write(row[: len(row) // 2])  # killed while writing step 3
    assert report(str(tmp_path))["step"] == 2
    with open(tmp_path / "timeline.jsonl", "a") as f:
        f.write("\n" + row + "\n")  # a bad line in the middle is an error
    with pytest.raises(ValueError, match=r"timeline.jsonl:\d+: not a timeline span"):
        report(str(tmp_path))


def test_cli_report(tmp_path, capsys):
    write_timeline(tmp_path)
    assert main(["report", str(tmp_path), "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 2, window 10.00 s, bubble fraction 20.0% over 2 device(s)" in out
    assert "device 0: busy 10.00 s (100.0%)" in out and "device 1: busy 6.00 s (60.0%)" in out
    assert f"wrote {tmp_path / 'timeline.png'}" in out
    assert main(["report", str(tmp_path), "--step", "9"]) == 2
    assert "has no step 9" in capsys.readouterr().err

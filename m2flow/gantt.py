"""`m2flow report RUN_DIR`: where one RL iteration's device time went, from the run's `timeline.jsonl`
(m2flow/timeline.py).

`report()` picks one iteration, draws it as a Gantt chart (`timeline.png`: one row per rank, bars colored by
stage) and measures its **bubble fraction**: the share of device time inside the iteration's window in which no
stage ran. Over the window [earliest start, latest end] of the iteration's spans (the driver's included: time
the driver spends while no device works is a bubble too), a device is busy while any span that runs on it is
open; overlapping spans on one device (collocated roles, a rank's nested stages) count once, a span on "0-1"
makes both devices busy, instant marks (start == end) and the driver's spans (it has no device) count not at all:

    bubble_fraction = 1 - sum(busy seconds per device) / (devices x window seconds)

The devices are those any non-driver span of the iteration names. Collocated runs show bubbles where a stage
waits on another's offload or on the driver; disaggregated ones where a device group waits on the other's
stream (rollout's tail, the weight sync).
"""

from __future__ import annotations

import os

from m2flow.scheduler.devices import parse_devices
from m2flow.timeline import Span, load_spans

ROLE_ORDER = ("rollout", "inference", "reward", "reference", "actor", "critic", "driver")
# Known stages first, in flow order, so a stage keeps its color from run to run; others follow, sorted.
STAGE_ORDER = ("generate", "group", "logprobs", "values", "reward", "advantage", "update", "optimizer_step",
               "weight_sync", "offload", "onload")


def steps_present(spans: list[Span]) -> list[int]:
    return sorted({s.step for s in spans})


def pick_step(spans: list[Span]) -> int:
    """The default iteration to show: the median of the steps present (the upper one of an even count), leaving
    out step 1 when there are more than 2 steps (it includes warm-up: compilation, first allocations)."""
    steps = steps_present(spans)
    if not steps:
        raise ValueError("no spans: no step to pick")
    if len(steps) > 2 and 1 in steps:
        steps.remove(1)
    return steps[len(steps) // 2]


def iteration_spans(spans: list[Span], step: int | None = None) -> list[Span]:
    """The spans of iteration `step` (default: `pick_step(spans)`), by start time."""
    if step is None:
        step = pick_step(spans)
    return sorted((s for s in spans if s.step == step), key=lambda s: (s.start, s.end))


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end] intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def bubble_fraction(spans: list[Span]) -> dict:
    """Over the window [min start, max end] of `spans` (one iteration's): {"window_s", "bubble_fraction",
    "busy_s": {device index: busy seconds}}. Busy = the union of the device's non-instant, non-driver spans;
    bubble_fraction = idle device seconds / (devices x window), NaN when there is no device or the window is 0."""
    if not spans:
        return {"window_s": 0.0, "bubble_fraction": float("nan"), "busy_s": {}}
    t0, t1 = min(s.start for s in spans), max(s.end for s in spans)
    window = t1 - t0
    intervals: dict[int, list[tuple[float, float]]] = {}
    for s in spans:
        if s.role == "driver":
            continue
        for d in parse_devices(s.devices):
            bucket = intervals.setdefault(d, [])
            if s.end > s.start:
                bucket.append((s.start, s.end))
    busy = {d: union_length(intervals[d]) for d in sorted(intervals)}
    capacity = len(busy) * window
    fraction = (capacity - sum(busy.values())) / capacity if capacity > 0 else float("nan")
    return {"window_s": window, "bubble_fraction": fraction, "busy_s": busy}


def _row_key(span: Span) -> tuple:
    """Rows ordered by device (a driver or deviceless rank last), then role in flow order, then rank."""
    devices = parse_devices(span.devices)
    role = ROLE_ORDER.index(span.role) if span.role in ROLE_ORDER else len(ROLE_ORDER)
    return (not devices, devices, role, span.role, span.rank)


def _row_label(span: Span) -> str:
    return f"{span.role} {span.rank}" + (f" (dev {span.devices})" if span.devices else "")


def plot_gantt(spans: list[Span], path: str, title: str) -> None:
    """Writes a Gantt chart of `spans` (one iteration's) to the PNG `path`: one row per (role, rank), grouped by
    device (a thin line between device groups), bars colored by stage, instant marks as short vertical ticks in
    their stage's color, x in seconds from the iteration's start; the title ends with the bubble fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows: dict[tuple, str] = {}
    for s in sorted(spans, key=_row_key):
        rows.setdefault((s.role, s.rank, s.devices), _row_label(s))
    keys = list(rows)
    index = {k: i for i, k in enumerate(keys)}
    stages = sorted({s.stage for s in spans},
                    key=lambda st: (STAGE_ORDER.index(st) if st in STAGE_ORDER else len(STAGE_ORDER), st))
    palette = plt.get_cmap("tab10" if len(stages) <= 10 else "tab20").colors
    color = {st: palette[i % len(palette)] for i, st in enumerate(stages)}
    t0 = min((s.start for s in spans), default=0.0)
    bubble = bubble_fraction(spans)

    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.42 * max(len(keys), 1)))
    bars: dict[tuple, list[tuple[float, float]]] = {}
    ticks: dict[str, tuple[list[float], list[int]]] = {}
    for s in spans:
        y = index[(s.role, s.rank, s.devices)]
        if s.end > s.start:
            bars.setdefault((y, s.stage), []).append((s.start - t0, s.end - s.start))
        else:
            xs, ys = ticks.setdefault(s.stage, ([], []))
            xs.append(s.start - t0)
            ys.append(y)
    for (y, stage), xranges in bars.items():
        ax.broken_barh(xranges, (y - 0.35, 0.7), facecolors=color[stage], edgecolor="white", linewidth=0.3)
    for stage, (xs, ys) in ticks.items():
        ax.vlines(xs, [y - 0.45 for y in ys], [y + 0.45 for y in ys], colors=[color[stage]], linewidth=1.2)
    for i in range(1, len(keys)):  # a line where the device group changes
        if parse_devices(keys[i][2]) != parse_devices(keys[i - 1][2]):
            ax.axhline(i - 0.5, color="0.6", linewidth=0.6)
    ax.set_yticks(range(len(keys)), [rows[k] for k in keys], fontsize=8)
    ax.set_ylim(len(keys) - 0.5, -0.5)  # the first row on top
    ax.set_xlabel("seconds from the iteration's start")
    ax.grid(axis="x", alpha=0.3)
    frac = bubble["bubble_fraction"]
    bubble_text = ("bubble fraction n/a" if frac != frac else
                   f"bubble fraction {frac:.1%} ({len(bubble['busy_s'])} devices x {bubble['window_s']:.2f} s)")
    ax.set_title(f"{title}: {bubble_text}" if title else bubble_text, fontsize=10)
    instants = {s.stage for s in spans if s.end <= s.start} - {s.stage for s in spans if s.end > s.start}
    handles = [Line2D([], [], color=color[st], marker="|", linestyle="", markersize=10, markeredgewidth=1.5)
               if st in instants else Patch(color=color[st]) for st in stages]
    ax.legend(handles, stages, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(path: str) -> list[Span]:
    """The spans of a timeline.jsonl (timeline.load_spans); a missing or empty file is a ValueError saying so."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file (a run writes its timeline.jsonl as iterations finish)")
    spans = load_spans(path)
    if not spans:
        raise ValueError(f"{path} is empty: no iteration has finished yet")
    return spans


def report(run_dir: str, step: int | None = None) -> dict:
    """Loads run_dir/timeline.jsonl, picks iteration `step` (default: `pick_step`), writes run_dir/timeline.png
    and returns {"step", "png", "window_s", "bubble_fraction", "busy_s"}. A missing or empty file, or a step it
    does not hold, is a ValueError naming the file."""
    path = os.path.join(run_dir, "timeline.jsonl")
    spans = _load(path)
    if step is None:
        step = pick_step(spans)
    elif step not in {s.step for s in spans}:
        steps = steps_present(spans)
        raise ValueError(f"{path} has no step {step} (it holds steps {steps[0]}-{steps[-1]}: {len(steps)} step(s))"
                         if steps == list(range(steps[0], steps[-1] + 1)) else
                         f"{path} has no step {step} (it holds steps {', '.join(map(str, steps))})")
    one = iteration_spans(spans, step)
    png = os.path.join(run_dir, "timeline.png")
    plot_gantt(one, png, f"{os.path.basename(os.path.normpath(run_dir))}, step {step}")
    return {"step": step, "png": png, **bubble_fraction(one)}

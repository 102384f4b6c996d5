"""The timeline: when each stage ran, per micro-batch, per rank, recorded inside the workers (not from the driver's
blocking calls), so a run shows where its devices were busy and where they waited.

A worker holds a `Recorder`; `with recorder.span("update", items=3):` records one `Span`, and `recorder.mark(...)`
an instant (a rollout group finishing). The runner drains every worker's spans after each iteration and appends
them, with the step, to the run's `timeline.jsonl`, one span per line:

    {"step": 3, "role": "actor", "rank": 0, "devices": "1", "stage": "update", "start": 1764570000.12,
     "end": 1764570000.52, "items": 3}

`start` / `end` are wall-clock seconds (time.time(), comparable across processes of one machine; across nodes as
far as their clocks agree). `devices` names the device indices the rank runs on ("0-1": a rank over two). Every
span also records the rank's memory when it ended: `rss_gb`, the process's resident memory, and on a GPU
`device_gb`, what torch holds there; `memory_metrics` turns a step's spans into each role's peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Span:
    role: str  # rollout | reward | inference | reference | actor | critic | driver
    rank: int
    devices: str  # the device indices the rank runs on, e.g. "0" or "0-1"
    stage: str  # generate | group | logprobs | values | update | optimizer_step | weight_sync | ...
    start: float  # time.time() seconds
    end: float  # == start for an instant (a mark)
    step: int = 0  # the RL iteration, set by the runner when it writes the span
    info: dict = field(default_factory=dict)  # e.g. {"items": 3}: written as extra keys

    def to_json(self) -> dict:
        out = asdict(self)
        return {**{k: v for k, v in out.items() if k != "info"}, **self.info}

    @classmethod
    def from_json(cls, row: dict) -> "Span":
        known = {k: row[k] for k in ("role", "rank", "devices", "stage", "start", "end", "step") if k in row}
        return cls(**known, info={k: v for k, v in row.items() if k not in known})


class Recorder:
    """The spans one rank records until they are drained."""

    def __init__(self, role: str, rank: int = 0, devices: str = ""):
        self.role, self.rank, self.devices = role, rank, devices
        self.spans: list[Span] = []

    @contextlib.contextmanager
    def span(self, stage: str, **info):
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            self.spans.append(Span(self.role, self.rank, self.devices, stage, start, end, info={**info, **memory()}))

    def mark(self, stage: str, **info) -> None:
        now = time.time()
        self.spans.append(Span(self.role, self.rank, self.devices, stage, now, now, info=info))

    def drain(self) -> list[Span]:
        spans, self.spans = self.spans, []
        return spans


def memory() -> dict[str, float]:
    """This process's memory now: {"rss_gb": resident memory} (Linux; {} elsewhere), plus {"device_gb": what
    torch has allocated on its GPU} when CUDA is in use."""
    out = {}
    try:
        with open("/proc/self/statm") as f:
            out["rss_gb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30, 4)
    except (OSError, ValueError):
        pass
    torch = sys.modules.get("torch")  # (not imported here: a process without torch has no GPU memory to report)
    if torch is not None and torch.cuda.is_initialized():
        out["device_gb"] = round(torch.cuda.memory_allocated() / 2**30, 4)
    return out


def memory_metrics(spans: list[Span]) -> dict[str, float]:
    """A step's peak memory per role, over the ends of its ranks' spans: memory/<role>_rss_gb (the largest rank's
    resident memory) and, on GPUs, memory/<role>_device_gb."""
    out: dict[str, float] = {}
    for s in spans:
        for key in ("rss_gb", "device_gb"):
            if key in s.info and s.role != "driver":
                name = f"memory/{s.role}_{key}"
                out[name] = max(out.get(name, 0.0), float(s.info[key]))
    return out


def append_spans(path: str, step: int, spans: list[Span]) -> None:
    """Appends `spans` as iteration `step` to the JSONL file `path` (one flushed write per iteration)."""
    lines = []
    for s in sorted(spans, key=lambda s: s.start):
        s.step = step
        lines.append(json.dumps(s.to_json()))
    if lines:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())


def load_spans(path: str) -> list[Span]:
    """Every span of a timeline.jsonl. A last line cut short (a run killed while appending) is dropped; any other
    line that is not a span is a ValueError naming the file and line."""
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    spans = []
    for i, (n, line) in enumerate(lines):
        try:
            spans.append(Span.from_json(json.loads(line)))
        except (ValueError, TypeError) as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{n}: not a timeline span ({e})") from None
    return spans


def drop_spans_after(path: str, step: int) -> None:
    """Keeps only the spans of steps <= `step` in the JSONL file `path` (a resumed run redoes the later steps, and
    a line its killed predecessor cut short goes too); rewritten atomically."""
    if not os.path.exists(path):
        return
    from m2flow.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(s.to_json()) + "\n" for s in load_spans(path) if s.step <= step))

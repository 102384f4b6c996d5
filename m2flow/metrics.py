"""Metrics sink: one JSON line per step (always) and TensorBoard scalars, plus plots at the end."""

from __future__ import annotations

import json
import os

import matplotlib

from m2flow.io import atomic_write_text

matplotlib.use("Agg")


class MetricsLogger:
    """Appends to <run_dir>/metrics.jsonl and TensorBoard. With `resume_after=k` (a run resumed from its
    checkpoint of step k), the rows of later steps, logged before the run was killed, are dropped first (from
    both), so every step appears once."""

    def __init__(self, run_dir: str, tensorboard: bool = True, resume_after: int | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_after is not None and os.path.exists(self.path):
            with open(self.path) as f:
                lines = [line for line in f if line.strip()]
            kept = []
            for line in lines:
                try:
                    if json.loads(line)["step"] <= resume_after:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except ValueError:  # a line cut short by the kill
                    pass
            atomic_write_text(self.path, "".join(kept))
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = {"purge_step": resume_after + 1} if resume_after is not None else {}
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), **purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(path: str, out_png: str, keys: list[str]) -> str:
    """One panel per metric key (those present), step on the x axis."""
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

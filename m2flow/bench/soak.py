"""The soak benchmark (`m2flow bench soak`): many small RL iterations of a micro model, with evaluation and
periodic checkpoints on, while a sampler thread records every second the memory (RSS), open file descriptors
and process count of the driver and of every process it started (Ray, its workers, reward workers). A leak
shows as growth between the early and the late part of the run; the report gives both and the slope.
Linux only (/proc). Not a test: a long run on a shared machine is a measurement, not a pass/fail check.
"""

from __future__ import annotations

import json
import os
import threading
import time

from m2flow.io import atomic_write_text
from m2flow.scheduler.orphans import descendants

MICRO = ["base.hidden_size=32", "base.num_layers=2", "base.num_heads=4", "base.num_kv_heads=2",
         "base.intermediate_size=64", "base.sft_examples=64", "base.sft_steps=4", "base.sft_batch_size=16",
         "data.synthetic_train_size=256", "data.synthetic_eval_size=16", "eval.num_problems=16",
         "eval.max_new_tokens=16", "rollout.max_new_tokens=16", "rollout.n=4", "train.prompts_per_step=4",
         "train.micro_batch_size=8", "algorithm.filter_groups=false", "eval.every=10", "checkpoint.every=10",
         "checkpoint.keep_last=2"]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_sample(pid: int) -> dict | None:
    """RSS (bytes), open file descriptors and name of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    return {"rss": rss, "fds": fds, "name": name}


def sample_tree(root: int) -> dict:
    """Totals over `root` and its descendants: RSS (MB), fds, processes, and RSS by process name."""
    total = {"rss_mb": 0.0, "fds": 0, "processes": 0, "rss_mb_by_name": {}}
    for pid in [root] + [p for p, _ in descendants(root)]:
        s = process_sample(pid)
        if s is None:
            continue
        name = "driver" if pid == root else s["name"]
        total["rss_mb"] += s["rss"] / 2**20
        total["fds"] += s["fds"]
        total["processes"] += 1
        total["rss_mb_by_name"][name] = total["rss_mb_by_name"].get(name, 0.0) + s["rss"] / 2**20
    return total


class TreeSampler(threading.Thread):
    """Samples `sample_tree(os.getpid())` every `interval_s`, tagged with the RL step (rows of metrics.jsonl
    under `output_dir`) reached so far."""

    def __init__(self, output_dir: str, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.output_dir, self.interval_s, self.samples = output_dir, interval_s, []
        self._done = threading.Event()

    def _step(self) -> int:
        step = 0
        for root, _, files in os.walk(self.output_dir):
            if "metrics.jsonl" in files:
                with open(os.path.join(root, "metrics.jsonl")) as f:
                    for line in f:
                        if line.strip().endswith("}"):
                            step = max(step, json.loads(line)["step"])
        return step

    def run(self) -> None:
        start = time.monotonic()
        while not self._done.wait(self.interval_s):
            self.samples.append({"t": time.monotonic() - start, "step": self._step(), **sample_tree(os.getpid())})

    def stop(self) -> list[dict]:
        self._done.set()
        self.join()
        return self.samples


def summarize(samples: list[dict], steps: int) -> dict:
    """The resources at 25%, 50% and 100% of the steps (the median of the samples in a 10%-of-steps window
    ending there) and their growth from 25% to 100%, per 100 steps."""
    def at(frac: float) -> dict:
        hi = frac * steps
        window = [s for s in samples if hi - 0.1 * steps <= s["step"] <= hi] or samples[-1:]
        mid = lambda key: sorted(s[key] for s in window)[len(window) // 2]  # noqa: E731
        return {"step": round(hi), "rss_mb": mid("rss_mb"), "fds": mid("fds"), "processes": mid("processes")}

    points = {f"{int(f * 100)}%": at(f) for f in (0.25, 0.5, 1.0)}
    early, late = points["25%"], points["100%"]
    span = max(late["step"] - early["step"], 1)
    growth = {k: (late[k] - early[k]) * 100 / span for k in ("rss_mb", "fds", "processes")}
    return {"points": points, "growth_per_100_steps": growth}


def format_report(result: dict) -> str:
    lines = ["| at | step | RSS, all processes (MB) | open fds | processes |", "|---|---|---|---|---|"]
    for name, p in result["summary"]["points"].items():
        lines.append(f"| {name} | {p['step']} | {p['rss_mb']:.0f} | {p['fds']} | {p['processes']} |")
    g = result["summary"]["growth_per_100_steps"]
    lines.append(f"\ngrowth from 25% to 100% of the run, per 100 steps: RSS {g['rss_mb']:+.1f} MB, "
                 f"fds {g['fds']:+.1f}, processes {g['processes']:+.1f}")
    return "\n".join(lines)


def plot(samples: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = [s["step"] for s in samples]
    names = sorted({n for s in samples for n in s["rss_mb_by_name"]})
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        axes[0].plot(steps, [s["rss_mb_by_name"].get(name, 0.0) for s in samples], label=name,
                     color=colors[i % len(colors)])
    axes[0].set_title("RSS by process (MB)", fontsize=9)
    axes[0].legend(fontsize=6)
    axes[1].plot(steps, [s["fds"] for s in samples])
    axes[1].set_title("open file descriptors", fontsize=9)
    axes[2].plot(steps, [s["processes"] for s in samples])
    axes[2].set_title("processes", fontsize=9)
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_soak(steps: int, overrides: list[str], out_dir: str, progress: bool = True) -> dict:
    """Runs the micro experiment for `steps` RL steps under the sampler; writes soak.json, soak.md, soak.png."""
    from m2flow.bench.learning import cpu_model
    from m2flow.config import load_config
    from m2flow.runner import run

    out = os.path.join(out_dir, f"soak-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out)
    cfg = load_config(None, [*MICRO, f"train.steps={steps}", f"output_dir={os.path.join(out, 'runs')}",
                             *overrides])
    sampler = TreeSampler(cfg.output_dir)
    sampler.start()
    try:
        summary = run(cfg, progress=progress)
    finally:
        samples = sampler.stop()
    result = {"steps": steps, "cpu": cpu_model(), "cores": os.cpu_count(), "rl_seconds": summary["rl_seconds"],
              "summary": summarize(samples, steps), "samples": samples, "overrides": overrides}
    atomic_write_text(os.path.join(out, "soak.json"), json.dumps(result, indent=1))
    result["table"] = format_report(result)
    atomic_write_text(os.path.join(out, "soak.md"), result["table"] + "\n")
    plot(samples, os.path.join(out, "soak.png"))
    result["path"] = out
    return result

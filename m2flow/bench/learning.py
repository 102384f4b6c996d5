"""The learning benchmark: one experiment run for several seeds (`m2flow demo --seeds 0,1,2,3,4`).

A single run's gain is a hint, not a claim: float rounding differs between CPUs and seeds change the base
model, the prompts and the samples. This runs the experiment once per seed (each seed builds its own base
model: `seed` drives the base's init, its SFT order, the prompts and the sampling), then reports the gain's
mean, standard deviation and minimum, a per-seed table and one plot with every seed's accuracy curve.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from m2flow.config import Config, load_config
from m2flow.io import atomic_write_text
from m2flow.metrics import read_metrics


def cpu_model() -> str:
    """The CPU's model name (as /proc/cpuinfo gives it), for result tables."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seed_row(seed: int, summary: dict) -> dict:
    """One seed's line of the table, from its run summary."""
    base = summary.get("base_model", {})
    return {
        "seed": seed,
        "base_accuracy": summary["held_out_accuracy_before"],
        "base_accuracy_by_sft_step": base.get("held_out_accuracy_by_sft_step", {}),
        "accuracy_after_rl": summary["held_out_accuracy_after"],
        "gain": summary["held_out_gain"],
        "worked_share_before": summary.get("held_out_worked_share_before"),
        "worked_share_after": summary.get("held_out_worked_share_after"),
        "base_build_seconds": base.get("build_seconds") if not base.get("cached") else None,
        "rl_seconds": summary["rl_seconds"],
        "run_dir": summary["run_dir"],
    }


def gain_stats(gains: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one seed), min and median of the gains."""
    return {"mean": statistics.fmean(gains), "std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "min": min(gains), "median": statistics.median(gains), "seeds": len(gains)}


def accuracy_curve(run_dir: str) -> list[tuple[int, float]]:
    """(RL step, held-out accuracy) points of one run, from its metrics.jsonl."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]


def plot_curves(rows: list[dict], out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        pts = accuracy_curve(row["run_dir"])
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=3,
                label=f"seed {row['seed']}: {100 * row['base_accuracy']:.1f} -> {100 * row['accuracy_after_rl']:.1f}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title("held-out accuracy by seed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def format_table(rows: list[dict], stats: dict) -> str:
    """A markdown table, one line per seed, and the gain's summary line."""
    lines = ["| seed | base accuracy | base at SFT steps | after RL | gain (points) | base build | RL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        curve = " / ".join(f"{100 * v:.1f}% @{k}" for k, v in r["base_accuracy_by_sft_step"].items())
        build = "cached" if r["base_build_seconds"] is None else f"{r['base_build_seconds']:.0f} s"
        lines.append(f"| {r['seed']} | {100 * r['base_accuracy']:.1f}% | {curve} | {100 * r['accuracy_after_rl']:.1f}% "
                     f"| {100 * r['gain']:+.1f} | {build} | {r['rl_seconds']:.0f} s |")
    lines.append(f"\ngain over {stats['seeds']} seeds: mean {100 * stats['mean']:+.1f} ± {100 * stats['std']:.1f} "
                 f"points (std), min {100 * stats['min']:+.1f}, median {100 * stats['median']:+.1f}")
    return "\n".join(lines)


def run_seeds(seeds: list[int], overrides: list[str], config_path: str | None = None, progress: bool = True,
              out_dir: str | None = None) -> dict:
    """Runs the experiment (defaults, then `config_path`, then `overrides`) once per seed; writes
    `seeds.json`, `seeds.md` and `seeds.png` to `out_dir` (default: <output_dir>/seeds-<time>) and returns
    {"rows", "gain", "cpu", "path"}."""
    from m2flow.runner import run

    configs: list[Config] = [load_config(config_path, [*overrides, f"seed={s}"]) for s in seeds]  # all errors first
    out_dir = out_dir or os.path.join(configs[0].output_dir, f"seeds-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for seed, cfg in zip(seeds, configs):
        print(f"m2flow demo: seed {seed} ({len(rows) + 1} of {len(seeds)})", flush=True)
        rows.append(seed_row(seed, run(cfg, progress=progress)))
    stats = gain_stats([r["gain"] for r in rows])
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "overrides": overrides, "config": config_path,
              "rows": rows, "gain": stats, "path": out_dir}
    atomic_write_text(os.path.join(out_dir, "seeds.json"), json.dumps(result, indent=2))
    table = format_table(rows, stats)
    atomic_write_text(os.path.join(out_dir, "seeds.md"), f"{cpu_model()}, {os.cpu_count()} cores\n\n{table}\n")
    plot_curves(rows, os.path.join(out_dir, "seeds.png"))
    return {**result, "table": table}

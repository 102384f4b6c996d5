"""The end-of-run summary table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict) -> None:
    base = summary.get("base_model", {})
    table = Table(title="m2flow run summary", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    n = summary["held_out_problems"]
    table.add_row(f"held-out accuracy, base ({n}, greedy)", f"{summary['held_out_accuracy_before']:.1%}")
    table.add_row(f"held-out accuracy, RL ({summary['rl_steps']} steps)", f"{summary['held_out_accuracy_after']:.1%}")
    table.add_row("gain (points)", f"{100 * summary['held_out_gain']:+.1f}")
    if "held_out_worked_share_before" in summary:  # the synthetic task's measure
        table.add_row("worked answers, base -> RL",
                      f"{summary['held_out_worked_share_before']:.0%} -> {summary['held_out_worked_share_after']:.0%}")
    for name, before in summary.get("benchmarks_before", {}).items():
        after = summary["benchmarks_after"][name]
        for metric in before:
            table.add_row(f"{name} {metric}, base -> RL", f"{before[metric]:.1%} -> {after[metric]:.1%}")
    for step, acc in base.get("held_out_accuracy_by_sft_step", {}).items():
        table.add_row(f"  base at SFT step {step}/{base['sft_steps']}", f"{acc:.1%}")
    if "build_seconds" in base:
        table.add_row("base model", "cached" if base.get("cached") else f"built in {base['build_seconds']:.0f}s")
    table.add_row("RL time", f"{summary['rl_seconds']:.0f}s")
    table.add_row("RL throughput", f"{summary['rl_samples_per_s']:.0f} samples/s")
    table.add_row("total time", f"{summary['total_seconds']:.0f}s")
    table.add_row("run directory", summary["run_dir"])
    table.add_row("final checkpoint", summary["final_checkpoint"])
    Console(width=max(100, Console().width)).print(table)

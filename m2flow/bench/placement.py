"""The placement benchmark (`m2flow bench placement`): one RL experiment run in each placement mode
(cluster.placement: collocated, disaggregated, or an RLinf-style spec) on the same devices, the same seed and the
same data, for a few steps; the iteration time of each, and its ratio to collocated measured in the same bench.

The iteration time is the median of metrics.jsonl's `time/step` over steps 2..N (step 1 pays for warm-up:
allocator, thread pools, first compilations); the medians of `time/rollout` and `time/update` over the same steps
say where the time went. Each run has checkpoints off (checkpoint.every=0), no evaluation between steps
(eval.every=0) and a small held-out set (eval.num_problems=16: the before/after evaluation is part of a run but not
of its steps). Overrides given to the command come after the bench's own, so any of these can be changed.

Workloads (`WORKLOADS`), each a list of config overrides and, for rollout_heavy, a training file it writes:

- rollout_heavy: a long tail of response lengths, where collocated devices idle while the last long responses
  finish. Each step's prompts are the config's own problems with exactly 10% of them (6 of the demo's 64) replaced
  by sums of 16-24 one-digit numbers; the demo's base model (trained on 2-4 operands) rambles on those, often up to
  the cap, rollout.max_new_tokens=176 (the demo's longest prompt, 65 tokens, + 176 fits its 256 positions). On
  the demo's base, the 6 steps' 3,072 responses: length p50 29, p90 47, p95 124, p99 176, max 176 tokens
  (max/p50 6.1x; the demo's own workload: p50 25, p90 41, max 48, 1.9x). The long groups score 0 and
  algorithm.filter_groups drops them, so the trainer's work stays that of the short responses: on one core,
  rollout ~1.9 s and update ~1.1 s per step (the demo: ~1.0 s and ~1.5 s).
- training_heavy: the trainer dominates: short responses (rollout.max_new_tokens=32: p50 25, max 32), four passes
  over each batch (train.epochs=4) and every group trained (algorithm.filter_groups=false). On one core: rollout
  ~0.85 s, update ~4 s per step.
- demo: the config as it is.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from typing import Callable

from m2flow.config import Config, ConfigError, load_config
from m2flow.io import atomic_write_text
from m2flow.metrics import read_metrics

BASELINE = "collocated"  # the mode every other mode's iteration time is compared with
FIRST_MEASURED_STEP = 2  # step 1 pays for warm-up
STAGE_KEYS = ("time/rollout", "time/update")  # per-stage medians shown beside the iteration time
LENGTH_KEYS = ("response/length_mean", "response/length_max")  # the workload as each run saw it
EXTRA_KEYS = ("time/reward", "time/logprobs", "time/weight_sync", "rollout/decode_steps",
              "rollout/decode_batch_mean")  # also in the JSON: the tail shows as many decode steps of small batches


@dataclass(frozen=True)
class Workload:
    name: str
    doc: str  # one line for the table's heading
    overrides: tuple[str, ...]  # config overrides (key=value), applied after the config file
    long_fraction: float = 0.0  # share of each step's prompts replaced by long operand chains (0 = the config's data)
    long_operands: tuple[int, int] = (16, 24)  # operands of a long chain: drawn from this range, inclusive

    def data_overrides(self, cfg: Config, data_dir: str) -> tuple[list[str], dict]:
        """The overrides that point the run at this workload's training file (written to `data_dir` for `cfg`'s
        steps, prompts per step and seed), and what the file holds; none for a workload without one."""
        if not self.long_fraction:
            return [], {}
        path = os.path.join(data_dir, f"{self.name}.jsonl")
        info = write_long_tail_data(cfg, path, self.long_fraction, self.long_operands)
        return [f"data.train_path={path}"], info


WORKLOADS = {
    "rollout_heavy": Workload(
        "rollout_heavy", "a long tail of response lengths: 10% of each step's prompts are 16-24-operand sums the "
                         "base rambles on, up to 176 tokens", ("rollout.max_new_tokens=176",), long_fraction=0.1),
    "training_heavy": Workload(
        "training_heavy", "the trainer dominates: responses of at most 32 tokens, 4 epochs over each batch, every "
                          "group trained",
        ("rollout.max_new_tokens=32", "train.epochs=4", "algorithm.filter_groups=false")),
    "demo": Workload("demo", "the config as it is", ()),
}


def bench_overrides(steps: int, devices: int) -> list[str]:
    """What every run of the bench sets: its steps and devices, no checkpoints, a small held-out evaluation only
    before and after the steps."""
    return [f"train.steps={steps}", f"cluster.devices={devices}", "checkpoint.every=0", "eval.every=0",
            "eval.num_problems=16", "eval.benchmarks=[]"]


def long_chain(rng: random.Random, operands: int) -> tuple[str, str]:
    """A sum of `operands` one-digit numbers (question, answer): far longer than the 2-4 operands the demo's base
    model was trained on."""
    xs = [rng.randint(1, 9) for _ in range(operands)]
    return f"Compute {'+'.join(map(str, xs))}.", str(sum(xs))


def write_long_tail_data(cfg: Config, path: str, fraction: float, operands: tuple[int, int]) -> dict:
    """Writes `cfg`'s training problems to `path` (jsonl) with, in every one of the train.steps steps, exactly
    round(fraction x prompts_per_step) prompts (at least 1) replaced by long operand chains. The file holds
    steps x prompts_per_step rows, placed where the run's seeded prompt sampler will draw them (one epoch), so the
    long prompts fall evenly over the steps, the same in every mode."""
    from m2flow.data.task import PromptSampler, load_task

    per_step, steps = cfg.train.prompts_per_step, cfg.train.steps
    short = load_task(cfg).train
    size = per_step * steps
    n_long = min(per_step, max(1, round(fraction * per_step)))
    rng = random.Random(cfg.seed)
    sampler = PromptSampler(size, cfg.seed)
    rows: list[tuple[str, str] | None] = [None] * size
    next_short = 0
    for _ in range(steps):
        ids = sampler.next(per_step)
        long_ids = set(rng.sample(ids, n_long))
        for i in ids:
            if i in long_ids:
                rows[i] = long_chain(rng, rng.randint(*operands))
            else:
                p = short[next_short % len(short)]
                rows[i] = (p.question, p.answer)
                next_short += 1
    d = cfg.data
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({d.prompt_key: q, d.answer_key: a}) + "\n" for q, a in rows))
    return {"rows": size, "long_per_step": n_long, "prompts_per_step": per_step, "long_operands": list(operands)}


def median_over_steps(rows: list[dict], key: str, first_step: int = FIRST_MEASURED_STEP) -> float | None:
    """The median of `key` over the metric rows of steps >= first_step that have it (None when none has)."""
    values = [r[key] for r in rows if r.get("step", 0) >= first_step and key in r]
    return statistics.median(values) if values else None


def mode_row(mode: str, metrics_rows: list[dict]) -> dict:
    """One mode's line: the median iteration seconds over steps 2..N (all steps when the run had only one), its
    iterations/s, and the stage and response-length medians over the same steps."""
    first = FIRST_MEASURED_STEP
    if median_over_steps(metrics_rows, "time/step", first) is None:
        first = 1
    steps = sorted(r["step"] for r in metrics_rows if r.get("step", 0) >= first and "time/step" in r)
    seconds = median_over_steps(metrics_rows, "time/step", first)
    row = {"mode": mode, "iteration_s": seconds, "iterations_per_s": 1 / seconds if seconds else None,
           "steps_measured": steps, "step_times": [r["time/step"] for r in metrics_rows if "time/step" in r]}
    for key in (*STAGE_KEYS, *LENGTH_KEYS, *EXTRA_KEYS):
        row[key] = median_over_steps(metrics_rows, key, first)
    return row


def add_ratios(rows: list[dict], baseline: str = BASELINE) -> str:
    """Sets each row's `speedup`: the baseline's iteration seconds over the row's (above 1: faster than the
    baseline), measured in the same bench; the baseline is `baseline` when it ran, else the first row that ran.
    Returns the baseline's mode."""
    ran = [r for r in rows if r.get("iteration_s")]
    base = next((r for r in ran if r["mode"] == baseline), ran[0] if ran else None)
    for r in rows:
        r["speedup"] = base["iteration_s"] / r["iteration_s"] if base and r.get("iteration_s") else None
    return base["mode"] if base else baseline


def split_modes(text: str) -> list[str]:
    """Comma-separated modes; commas inside braces or quotes (an RLinf spec such as
    {"rollout,inference": "0", actor: "1"}) do not split."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return [m for m in out if m]


def mode_overrides(mode: str) -> list[str]:
    """A mode's config overrides: its placement, then any `+key=value` terms after it
    ("disaggregated+algorithm.max_staleness=1": the disaggregated placement, one-step off-policy)."""
    placement, *extra = mode.split("+")
    return [f"cluster.placement={placement.strip()}", *(e.strip() for e in extra if e.strip())]


def machine_tag(device: str = "auto") -> str:
    """The result files' machine name: cpu-<cores>cores, or the GPU's name and count (as other benches name it)."""
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0).replace(" ", "-").lower()
                return f"{name}x{torch.cuda.device_count()}"
        except Exception:  # noqa: BLE001 (no usable torch.cuda: a CPU run)
            pass
    return f"cpu-{os.cpu_count()}cores"


def format_table(workload: dict, steps: int) -> str:
    """One workload's markdown table: a line per mode."""
    base = workload["baseline"]
    measured = f"steps {FIRST_MEASURED_STEP}-{steps}" if steps >= FIRST_MEASURED_STEP else "step 1"
    lines = [f"**{workload['name']}**: {workload['doc']}", "",
             f"| placement | iteration s (median, {measured}) | iterations/s | vs {base} | rollout s | update s "
             f"| response length mean / max |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in workload["rows"]:
        if r.get("error"):
            error = r["error"] if r["error"].startswith("not run") else f"failed: {r['error']}"
            lines.append(f"| {r['mode']} | {error[:200]} | | | | | |")
            continue
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['mode']} | {fmt(r['iteration_s'], '.2f')} | {fmt(r['iterations_per_s'], '.3f')} | "
                     f"{speed} | {fmt(r['time/rollout'], '.2f')} | {fmt(r['time/update'], '.2f')} | "
                     f"{fmt(r['response/length_mean'], '.1f')} / {fmt(r['response/length_max'], '.0f')} |")
    return "\n".join(lines)


def format_tables(result: dict) -> str:
    return "\n\n".join(format_table(w, result["steps"]) for w in result["workloads"])


def run_placement_benchmark(workloads: list[str], modes: list[str], steps: int = 6, devices: int = 2,
                            overrides: list[str] | None = None, config_path: str | None = None,
                            out_dir: str = "benchmarks/results", progress: bool = True,
                            run_fn: Callable[[Config, bool], dict] | None = None) -> dict:
    """Runs every workload in every mode (`run_fn(cfg, progress)`, default m2flow.runner.run, returns the run's
    summary with its run_dir); writes placement-<machine>.json and .md to `out_dir` and returns the result with
    its `table` and `path`. Every config is built and checked before anything runs (ConfigError); a run that fails
    is recorded as its mode's error and the bench goes on."""
    if run_fn is None:
        from m2flow.runner import run as run_fn
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise ValueError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; workloads: "
                         f"{', '.join(WORKLOADS)}")
    if not modes:
        raise ValueError("no placement modes given, e.g. collocated,disaggregated")
    overrides = list(overrides or [])
    data_dir = tempfile.mkdtemp(prefix="m2flow-placement-")
    try:
        plans = []  # (workload, its data info, [(mode, cfg)]): every config checked before the first run
        for name in workloads:
            w = WORKLOADS[name]
            common = [*w.overrides, *bench_overrides(steps, devices), *overrides]
            data, info = w.data_overrides(load_config(config_path, common), data_dir)
            configs = []
            for mode in modes:  # a mode that does not apply to this workload is reported, not run
                try:
                    configs.append((mode, load_config(config_path, [*common, *data, f"name=placement-{name}",
                                                                    *mode_overrides(mode)])))
                except ConfigError as e:
                    configs.append((mode, f"not run: {e}"))
            plans.append((w, info, [*common, *data], configs))
        device = next(c.cluster.device for p in plans for _, c in p[3] if not isinstance(c, str))
        results, total, done = [], len(workloads) * len(modes), 0
        for w, info, used, configs in plans:
            rows = []
            for mode, cfg in configs:
                done += 1
                if isinstance(cfg, str):  # the reason it does not apply
                    rows.append({"mode": mode, "error": cfg})
                    continue
                print(f"m2flow bench placement: {w.name}, {mode} ({done} of {total})", flush=True)
                try:
                    summary = run_fn(cfg, progress)
                except Exception as e:  # noqa: BLE001 (recorded; the other modes still run)
                    rows.append({"mode": mode, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                    continue
                metrics = read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl"))
                rows.append({**mode_row(mode, metrics), "run_dir": summary["run_dir"]})
            baseline = add_ratios(rows)
            results.append({"name": w.name, "doc": w.doc, "overrides": used, "data": info, "baseline": baseline,
                            "rows": rows})
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    from m2flow.bench.learning import cpu_model

    tag = machine_tag(device)
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "tag": tag}, "config": config_path,
              "overrides": overrides, "steps": steps, "devices": devices, "modes": modes, "workloads": results}
    table = format_tables(result)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"placement-{tag}")
    atomic_write_text(path + ".json", json.dumps(result, indent=2))
    atomic_write_text(path + ".md", f"m2flow bench placement: {result['machine']['cpu']}, {os.cpu_count()} cores, "
                                    f"cluster.devices={devices}, {steps} steps per run\n\n{table}\n")
    return {**result, "table": table, "path": path + ".json", "md_path": path + ".md"}


def config_for(workload: str, overrides: list[str] | None = None, config_path: str | None = None, steps: int = 6,
               devices: int = 2) -> Config:
    """The config a workload's runs share, before its data file and the placement: for checks and experiments."""
    return load_config(config_path, [*WORKLOADS[workload].overrides, *bench_overrides(steps, devices),
                                     *(overrides or [])])


"""`m2flow bench placement`: the median over steps 2..N, the ratios to collocated, the workloads' configs and data,
the written JSON/MD and the command line, over stand-in runs (no RL step runs here)."""

from __future__ import annotations

import json
import os

import pytest

import m2flow.bench.placement as placement
import m2flow.config
from m2flow.bench.placement import (WORKLOADS, add_ratios, bench_overrides, format_table, long_chain, mode_row,
                                    run_placement_benchmark, split_modes, write_long_tail_data)
from m2flow.cli import main
from m2flow.config import load_config
from m2flow.data.task import PromptSampler, load_task
from m2flow.data.templates import format_prompt
from m2flow.metrics import read_metrics

SMALL = ["data.synthetic_train_size=300", "data.synthetic_eval_size=20", "base.sft_examples=64",
         "train.prompts_per_step=10", "rollout.n=2"]  # fast to load; the fake runs do not care


def write_metrics(run_dir, step_seconds: list[float], stages: bool = True) -> None:
    """A run's metrics.jsonl as the runner writes it: the step-0 evaluation, one row per step, the final evaluation
    (a second row of the last step, without timings)."""
    os.makedirs(run_dir, exist_ok=True)
    rows = [{"step": 0, "eval/accuracy": 0.2}]
    for step, seconds in enumerate(step_seconds, start=1):
        row = {"step": step, "time/step": seconds, "response/length_mean": 20.0 + step, "response/length_max": 48.0}
        if stages:
            row |= {"time/rollout": seconds * 0.6, "time/update": seconds * 0.3}
        rows.append(row)
    rows.append({"step": len(step_seconds), "eval/accuracy": 0.3})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_median_over_steps_two_to_n(tmp_path):
    write_metrics(tmp_path, [30.0, 2.0, 4.0, 3.0, 5.0, 1.0])  # step 1 (warm-up) is left out
    row = mode_row("collocated", read_metrics(tmp_path / "metrics.jsonl"))
    assert row["iteration_s"] == 3.0 and row["iterations_per_s"] == pytest.approx(1 / 3)
    assert row["steps_measured"] == [2, 3, 4, 5, 6] and row["step_times"][0] == 30.0
    assert row["time/rollout"] == pytest.approx(1.8) and row["time/update"] == pytest.approx(0.9)
    assert row["response/length_mean"] == 24.0 and row["response/length_max"] == 48.0


def test_missing_stage_keys_and_a_one_step_run(tmp_path):
    write_metrics(tmp_path / "a", [7.0, 2.0, 4.0], stages=False)
    row = mode_row("disaggregated", read_metrics(tmp_path / "a" / "metrics.jsonl"))
    assert row["iteration_s"] == 3.0 and row["time/rollout"] is None and row["time/update"] is None
    write_metrics(tmp_path / "b", [7.0])  # only step 1: it is all there is to measure
    row = mode_row("collocated", read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert row["iteration_s"] == 7.0 and row["steps_measured"] == [1]


def test_ratios_against_collocated_measured_in_the_same_bench():
    rows = [{"mode": "disaggregated", "iteration_s": 2.0}, {"mode": "collocated", "iteration_s": 3.0},
            {"mode": "{rollout: '0', actor: '1'}", "iteration_s": 6.0}, {"mode": "hybrid", "error": "boom"}]
    assert add_ratios(rows) == "collocated"
    assert [r["speedup"] for r in rows] == [pytest.approx(1.5), 1.0, 0.5, None]
    rows = [{"mode": "collocated", "error": "boom"}, {"mode": "disaggregated", "iteration_s": 2.0},
            {"mode": "x", "iteration_s": 4.0}]  # no collocated run: the first mode that ran is the baseline
    assert add_ratios(rows) == "disaggregated" and rows[2]["speedup"] == 0.5 and rows[0]["speedup"] is None


def test_table_lines():
    workload = {"name": "rollout_heavy", "doc": "a long tail", "baseline": "collocated", "rows": [
        {"mode": "collocated", "iteration_s": 3.0, "iterations_per_s": 1 / 3, "speedup": 1.0, "time/rollout": 2.0,
         "time/update": None, "response/length_mean": 31.25, "response/length_max": 176.0},
        {"mode": "disaggregated", "error": "PlacementError: no"}]}
    table = format_table(workload, steps=6)
    assert "| placement | iteration s (median, steps 2-6) | iterations/s | vs collocated |" in table
    assert "| collocated | 3.00 | 0.333 | 1.00x | 2.00 | - | 31.2 / 176 |" in table
    assert "| disaggregated | failed: PlacementError: no |" in table


def test_split_modes_keeps_specs_whole():
    assert split_modes("collocated, disaggregated") == ["collocated", "disaggregated"]
    assert split_modes('collocated,{"rollout,inference": "0", actor: "1"},{rollout: \'0\', actor: \'1\'}') == [
        "collocated", '{"rollout,inference": "0", actor: "1"}', "{rollout: '0', actor: '1'}"]


@pytest.mark.parametrize("config_path", [None, "configs/tiny_math_grpo.yaml"])
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_overrides_are_valid_configs(name, config_path):
    # the placement override is left out: config validation accepts only collocated until the modes land
    cfg = load_config(config_path, [*WORKLOADS[name].overrides, *bench_overrides(6, 2)])
    assert cfg.train.steps == 6 and cfg.cluster.devices == 2 and cfg.checkpoint.every == 0 and cfg.eval.every == 0
    if name == "training_heavy":
        assert cfg.rollout.max_new_tokens <= 32 and cfg.train.epochs >= 2 and not cfg.algorithm.filter_groups


def test_long_tail_prompts_fit_the_demo_model(tokenizer):
    """The longest chain, and the demo's longest training prompt, leave room for rollout_heavy's max_new_tokens in
    the demo base's 256 positions (else the run stops at start-up: prompt too long)."""
    max_new = load_config(None, list(WORKLOADS["rollout_heavy"].overrides)).rollout.max_new_tokens
    longest = "Compute " + "+".join(["9"] * WORKLOADS["rollout_heavy"].long_operands[1]) + "."
    demo_longest = max((p.question for p in load_task(load_config(None, [])).train), key=len)
    for question in (longest, demo_longest):
        assert len(tokenizer(format_prompt(question, tokenizer, "chat"), add_special_tokens=False).input_ids) + \
            max_new <= 256


def test_long_tail_data_gives_every_step_the_same_share(tmp_path):
    import random

    q, a = long_chain(random.Random(0), 5)
    assert q.startswith("Compute ") and q.count("+") == 4 and int(a) == sum(int(x) for x in q[8:-1].split("+"))
    cfg = load_config(None, [*SMALL, "train.steps=4"])
    info = write_long_tail_data(cfg, str(tmp_path / "d.jsonl"), 0.3, (16, 24))
    assert info == {"rows": 40, "long_per_step": 3, "prompts_per_step": 10, "long_operands": [16, 24]}
    rows = [json.loads(line) for line in open(tmp_path / "d.jsonl")]
    assert len(rows) == 40 and all(set(r) == {"question", "answer"} for r in rows)
    sampler = PromptSampler(len(rows), cfg.seed)  # the run's own draws: 3 long prompts in each step
    for _ in range(4):
        ids = sampler.next(10)
        assert sum(rows[i]["question"].count("+") >= 15 for i in ids) == 3
    short = {p.question for p in load_task(cfg).train}
    assert sum(r["question"] in short for r in rows) == 28


def test_run_writes_json_and_md_with_every_mode(tmp_path, monkeypatch):
    # the modes other than collocated are let through config validation here, as they will be once they land
    monkeypatch.setattr(m2flow.config, "PLACEMENTS", ("collocated", "disaggregated"), raising=False)
    seconds = {("rollout_heavy", "collocated"): 4.0, ("rollout_heavy", "disaggregated"): 2.0,
               ("training_heavy", "collocated"): 5.0}
    calls = []

    def fake_run(cfg, progress=True):
        workload = cfg.name.removeprefix("placement-")
        calls.append((workload, cfg))
        if cfg.data.train_path:  # the workload's file exists while its runs run
            assert os.path.isfile(cfg.data.train_path)
        if (workload, cfg.cluster.placement) not in seconds:
            raise RuntimeError("disaggregated is not there yet\nmore detail")
        run_dir = tmp_path / "runs" / f"{workload}-{cfg.cluster.placement}"
        write_metrics(run_dir, [60.0] + [seconds[workload, cfg.cluster.placement]] * 3)
        return {"run_dir": str(run_dir)}

    out = tmp_path / "results"
    result = run_placement_benchmark(["rollout_heavy", "training_heavy"], ["collocated", "disaggregated"], steps=4,
                                     devices=2, overrides=SMALL, out_dir=str(out), progress=False, run_fn=fake_run)
    assert [(w, c.cluster.placement) for w, c in calls] == [
        ("rollout_heavy", "collocated"), ("rollout_heavy", "disaggregated"),
        ("training_heavy", "collocated"), ("training_heavy", "disaggregated")]
    assert all(c.seed == 0 and c.train.steps == 4 and c.cluster.devices == 2 and c.checkpoint.every == 0
               for _, c in calls)
    heavy = [c for w, c in calls if w == "rollout_heavy"]
    assert heavy[0].data.train_path == heavy[1].data.train_path != ""  # the same data in every mode
    assert heavy[0].rollout.max_new_tokens == 176 and not os.path.exists(heavy[0].data.train_path)  # cleaned up
    assert [c.train.epochs for w, c in calls if w == "training_heavy"] == [4, 4]

    tag = placement.machine_tag("cpu")
    assert result["path"] == str(out / f"placement-{tag}.json")
    saved = json.loads((out / f"placement-{tag}.json").read_text())
    assert saved["modes"] == ["collocated", "disaggregated"] and saved["steps"] == 4
    rh, th = saved["workloads"]
    assert [r["mode"] for r in rh["rows"]] == ["collocated", "disaggregated"]
    assert rh["rows"][1]["iteration_s"] == 2.0 and rh["rows"][1]["speedup"] == 2.0
    assert rh["data"]["long_per_step"] == 1 and "data.train_path=" in rh["overrides"][-1]
    assert th["rows"][1]["error"] == "RuntimeError: disaggregated is not there yet"
    md = (out / f"placement-{tag}.md").read_text()
    for text in ("**rollout_heavy**", "**training_heavy**", "| collocated | 4.00 | 0.250 | 1.00x | 2.40 | 1.20 |",
                 "| disaggregated | 2.00 | 0.500 | 2.00x |", "| disaggregated | failed: RuntimeError"):
        assert text in md
    assert result["table"] in md


def test_a_bad_override_stops_before_any_run(tmp_path):
    def never(cfg, progress=True):
        raise AssertionError("no run may start")

    with pytest.raises(m2flow.config.ConfigError, match="train.epochz"):
        run_placement_benchmark(["training_heavy"], ["collocated"], overrides=["train.epochz=2"],
                                out_dir=str(tmp_path), run_fn=never)


def test_cli_parses(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(workloads, modes, steps, devices, overrides, config, out_dir, progress=True):
        seen.update(workloads=workloads, modes=modes, steps=steps, devices=devices, overrides=overrides,
                    config=config, out_dir=out_dir, progress=progress)
        return {"machine": {"cpu": "cpu", "cores": 2}, "table": "TABLE", "path": "p.json", "md_path": "p.md",
                "workloads": [{"rows": [{"mode": "collocated"}]}]}

    monkeypatch.setattr(placement, "run_placement_benchmark", fake)
    rc = main(["bench", "placement", "configs/tiny_math_grpo.yaml", "--modes",
               'collocated,{rollout: "0", actor: "1"}', "--steps", "3", "--out", str(tmp_path), "--no-progress",
               "train.prompts_per_step=8"])
    assert rc == 0 and "TABLE" in capsys.readouterr().out
    assert seen == {"workloads": ["rollout_heavy", "training_heavy"],
                    "modes": ["collocated", '{rollout: "0", actor: "1"}'], "steps": 3, "devices": 2,
                    "overrides": ["train.prompts_per_step=8"], "config": "configs/tiny_math_grpo.yaml",
                    "out_dir": str(tmp_path), "progress": False}
    assert main(["bench", "placement", "rollout.n=4", "--workloads", "demo", "--devices", "1"]) == 0
    assert seen["config"] is None and seen["overrides"] == ["rollout.n=4"] and seen["workloads"] == ["demo"]
    assert seen["modes"] == ["collocated", "collocated+cluster.context_switch=true", "disaggregated",
                             "disaggregated+algorithm.max_staleness=1"]
    assert seen["devices"] == 1 and seen["steps"] == 6
    assert main(["bench", "placement", "--workloads", "nope"]) == 2
    assert main(["bench", "placement", "--steps", "1"]) == 2


def test_a_mode_carries_its_own_overrides():
    from m2flow.bench.placement import mode_overrides

    assert mode_overrides("collocated") == ["cluster.placement=collocated"]
    assert mode_overrides("disaggregated+algorithm.max_staleness=1") == ["cluster.placement=disaggregated",
                                                                         "algorithm.max_staleness=1"]
    assert mode_overrides('{rollout: "0", actor: "1"} + train.lr=1e-4') == ['cluster.placement={rollout: "0", actor: "1"}',
                                                                           "train.lr=1e-4"]


def test_a_mode_that_does_not_apply_is_reported_not_run(tmp_path):
    """One-step off-policy needs a streamed pipeline: with train.epochs=4 (training_heavy) its row says why."""
    from m2flow.bench.placement import run_placement_benchmark

    def fake(cfg, progress):
        run_dir = tmp_path / f"run-{cfg.cluster.placement}-{cfg.algorithm.max_staleness}"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "time/step": 2.0}}\n' for s in (1, 2, 3)))
        return {"run_dir": str(run_dir)}

    result = run_placement_benchmark(["training_heavy"], ["collocated", "disaggregated+algorithm.max_staleness=1"],
                                     steps=3, out_dir=str(tmp_path / "out"), progress=False, run_fn=fake)
    rows = result["workloads"][0]["rows"]
    assert rows[0]["iteration_s"] == 2.0
    assert rows[1]["error"].startswith("not run: algorithm.max_staleness=1 needs a streamed pipeline")
    assert "not run: algorithm.max_staleness=1" in result["table"]

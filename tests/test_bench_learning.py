"""`m2flow demo --seeds`: the per-seed table, the gain's statistics and the curves plot, over stand-in runs
(the experiment itself is covered by the e2e tests; here `run` returns prepared summaries)."""

from __future__ import annotations

import json
import os

import pytest

import m2flow.runner
from m2flow.bench.learning import format_table, gain_stats, run_seeds
from m2flow.cli import main


def test_gain_stats_by_hand():
    stats = gain_stats([0.20, 0.30, 0.10])
    assert stats["mean"] == pytest.approx(0.20)
    assert stats["std"] == pytest.approx(0.10)  # sample std: sqrt((0.01 + 0.01 + 0) / 2)
    assert stats["min"] == pytest.approx(0.10) and stats["median"] == pytest.approx(0.20) and stats["seeds"] == 3
    assert gain_stats([0.25])["std"] == 0.0


def fake_run(tmp_path, results: dict[int, tuple[float, float]], calls: list):
    """A stand-in for runner.run: writes a metrics.jsonl with an accuracy curve and returns a summary."""

    def run(cfg, progress=True):
        calls.append(cfg)
        before, after = results[cfg.seed]
        run_dir = tmp_path / f"run-{cfg.seed}"
        run_dir.mkdir()
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step, acc in ((0, before), (5, (before + after) / 2), (10, after)):
                f.write(json.dumps({"step": step, "eval/accuracy": acc}) + "\n")
        return {"run_dir": str(run_dir), "held_out_accuracy_before": before, "held_out_accuracy_after": after,
                "held_out_gain": after - before, "held_out_worked_share_before": 0.1,
                "held_out_worked_share_after": 0.9, "rl_seconds": 100.0,
                "base_model": {"build_seconds": 150.0, "cached": False, "sft_steps": 800,
                               "held_out_accuracy_by_sft_step": {"600": before - 0.01, "800": before}}}

    return run


def test_run_seeds_writes_table_json_and_plot(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(m2flow.runner, "run", fake_run(tmp_path, {3: (0.20, 0.45), 4: (0.25, 0.40)}, calls))
    result = run_seeds([3, 4], ["train.steps=10"], progress=False, out_dir=str(tmp_path / "seeds"))
    assert [c.seed for c in calls] == [3, 4] and all(c.train.steps == 10 for c in calls)
    assert result["gain"]["mean"] == pytest.approx(0.20) and result["gain"]["min"] == pytest.approx(0.15)
    saved = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert [r["seed"] for r in saved["rows"]] == [3, 4] and saved["rows"][0]["gain"] == pytest.approx(0.25)
    assert os.path.getsize(tmp_path / "seeds" / "seeds.png") > 1000
    table = (tmp_path / "seeds" / "seeds.md").read_text()
    assert "| 3 | 20.0% | 19.0% @600 / 20.0% @800 | 45.0% | +25.0 | 150 s | 100 s |" in table
    assert "mean +20.0 ± 7.1 points (std), min +15.0, median +20.0" in table


def test_format_table_marks_a_cached_base():
    row = {"seed": 0, "base_accuracy": 0.2, "base_accuracy_by_sft_step": {}, "accuracy_after_rl": 0.5, "gain": 0.3,
           "base_build_seconds": None, "rl_seconds": 90.0}
    assert "| 0 | 20.0% |  | 50.0% | +30.0 | cached | 90 s |" in format_table([row], gain_stats([0.3]))


def test_cli_demo_seeds_rejects_bad_input(capsys):
    assert main(["demo", "--seeds", "0,x"]) == 2
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0,1", "seed=3"]) == 2
    assert "not seed=" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0", "train.lr_typo=1"]) == 2
    assert "config error" in capsys.readouterr().err

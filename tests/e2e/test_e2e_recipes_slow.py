"""Every algorithm recipe in configs/ end to end for a few steps on a micro model (`make test-slow`, or
`.venv/bin/pytest -q -m slow tests/e2e/test_e2e_recipes_slow.py`; about 30 s per recipe on 2 CPU cores)."""

from __future__ import annotations

import json
import math
import os

import pytest
from test_e2e_grpo import MICRO  # also registers the e2e_has_digit reward (tests/e2e is on sys.path)

from m2flow.config import load_config
from m2flow.runner import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = ["grpo", "dr_grpo", "dapo", "ppo", "reinforce_pp", "rloo", "gspo"]
# the micro model, few steps, no periodic checkpoints; the recipe's algorithm keys are kept
OVERRIDES = [o for o in MICRO if not o.startswith(("checkpoint.", "train.steps"))] + ["train.steps=3"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_end_to_end(name, tmp_path):
    path = os.path.join(ROOT, "configs", f"tiny_math_{name}.yaml")
    cfg = load_config(path, OVERRIDES + [f"output_dir={tmp_path / 'runs'}", f"base.cache_dir={tmp_path / 'cache'}"])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in (json.loads(line) for line in f) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    trained = [r for r in steps if "actor/pg_loss" in r]
    assert trained, "no step trained"
    for r in trained:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    if cfg.algorithm.advantage == "gae":
        assert all("critic/value_loss" in r for r in trained)
    if cfg.algorithm.kl_in_reward:
        assert all("reward/kl" in r and "actor/kl" not in r for r in trained)
    if cfg.algorithm.dynamic_sampling_max_tries > 1:
        assert all(1 <= r["batch/sampling_rounds"] <= cfg.algorithm.dynamic_sampling_max_tries for r in steps)
    assert 0.0 <= summary["held_out_accuracy_after"] <= 1.0

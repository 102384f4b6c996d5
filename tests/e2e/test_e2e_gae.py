"""End to end: PPO with a critic (algorithm.advantage=gae) through Ray on a micro model, with other options
of issue 4 switched on too (whitening, value clipping, dual-clip, truncated importance sampling, soft overlong
punishment, reward scaling and clipping, dynamic sampling). KL in the reward needs a fourth worker (the
reference) and is covered by the reinforce_pp recipe's slow test and by unit tests."""

from __future__ import annotations

import json
import math
import os

import pytest

from m2flow.config import load_config
from m2flow.runner import run

from test_e2e_grpo import MICRO  # also registers the e2e_has_digit reward (tests/e2e is on sys.path)

GAE = [o for o in MICRO if not o.startswith(("checkpoint.", "train.steps"))] + [
    "train.steps=2", "algorithm.advantage=gae", "algorithm.gamma=1.0", "algorithm.lam=0.95",
    "algorithm.value_clip=0.5", "algorithm.whiten_advantages=true",
    "algorithm.clip_ratio_c=3.0", "algorithm.tis_cap=2.0",
    "reward.overlong_buffer=4", "reward.scale=2.0", "reward.clip=2.0",
    "algorithm.dynamic_sampling_max_tries=3", "critic.lr=1e-3", "eval.num_problems=8",
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_gae")
    cfg = load_config(None, GAE + [f"output_dir={root / 'runs'}", f"base.cache_dir={root / 'cache'}"])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ppo_with_critic_runs_and_reports(rows):
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    trained = [r for r in steps if "critic/value_loss" in r]
    assert trained, "no step had an informative group"
    for r in trained:
        for key in ("critic/value_loss", "critic/vf_explained_var", "critic/grad_norm", "actor/pg_loss",
                    "actor/pg_tis_weight_mean", "actor/pg_dual_clip_frac", "advantage/abs_mean",
                    "time/critic_update"):
            assert math.isfinite(r[key]), (key, r[key])
        assert r["critic/value_loss"] > 0
    for r in steps:
        for key in ("batch/sampling_rounds", "batch/dropped_groups", "batch/kept_groups", "reward/shaped_mean",
                    "reward/overlong_penalty_mean"):
            assert math.isfinite(r[key]), (key, r[key])
        assert 1 <= r["batch/sampling_rounds"] <= 3
        assert r["batch/kept_groups"] <= 4

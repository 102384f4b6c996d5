"""The trainer as a group of 2 ranks inside a real run (issue 14): Ray launches two ActorWorkers that form a
gloo group, FSDP2 shards the policy over them and each trains on its half of the batch by tokens. With 2 logical
CPU devices (cluster.devices=2, one core each where the machine has 2) the ranks and 2 engine replicas are
pinned one per device. One RL step of the micro model gives the one-rank run's metrics and final weights (to
float rounding)."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from m2flow.config import load_config
from m2flow.runner import run

from test_e2e_grpo import MICRO  # also registers the e2e_has_digit reward

ONE_STEP = [o for o in MICRO if not o.startswith(("checkpoint.", "train.steps"))] + ["train.steps=1", "eval.num_problems=8"]


def _run(root, ranks: int) -> tuple[dict, dict]:
    devices = min(ranks, len(os.sched_getaffinity(0)))
    cfg = load_config(None, ONE_STEP + [f"train.ranks={ranks}", f"rollout.replicas={ranks}", f"cluster.devices={devices}",
                                        f"name=ranks{ranks}", f"output_dir={root / 'runs'}",
                                        f"base.cache_dir={root / 'cache'}"])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        step = next(r for r in map(json.loads, f) if "actor/pg_loss" in r)
    return step, load_file(os.path.join(summary["final_checkpoint"], "model.safetensors"))


def test_two_trainer_ranks_equal_one(tmp_path):
    one, weights_one = _run(tmp_path, 1)
    two, weights_two = _run(tmp_path, 2)
    assert two["reward/mean"] == one["reward/mean"]  # the same rollout: the engines got the same weights
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert max((weights_two[k] - weights_one[k]).abs().max().item() for k in weights_one) < 1e-5

"""The trainer as a group of 2 ranks inside a real run (issue 14): Ray launches two ActorWorkers that form a
gloo group, FSDP2 shards the policy over them and each trains on its half of the batch by tokens. With 2 logical
CPU devices (cluster.devices=2, one core each where the machine has 2) the ranks and 2 engine replicas are
pinned one per device. One RL step of the micro model gives the one-rank run's metrics and final weights (to
float rounding). On a simulated 2-node Ray cluster (ray.cluster_utils.Cluster), the groups span both nodes, one
device each, with the one-node result (slow-marked; tests/test_scheduler_devices.py checks, in the default suite,
that a group's ranks land on their devices' nodes). With a critic and a KL term, the critic and the reference run
as 2-rank groups too, with the one-rank run's metrics (slow-marked)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
from safetensors.torch import load_file

from m2flow.config import load_config
from m2flow.runner import run

from test_e2e_grpo import MICRO  # also registers the e2e_has_digit reward

ONE_STEP = [o for o in MICRO if not o.startswith(("checkpoint.", "train.steps"))] + ["train.steps=1", "eval.num_problems=8"]


def _run(root, ranks: int, *overrides: str) -> tuple[dict, dict]:
    devices = min(ranks, len(os.sched_getaffinity(0)))
    cfg = load_config(None, ONE_STEP + [f"train.ranks={ranks}", f"rollout.replicas={ranks}", f"cluster.devices={devices}",
                                        f"name=ranks{ranks}", f"output_dir={root / 'runs'}",
                                        f"base.cache_dir={root / 'cache'}", *overrides])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "actor/pg_loss" in r]
    assert len(steps) == cfg.train.steps
    return steps[0], load_file(os.path.join(summary["final_checkpoint"], "model.safetensors")), summary["run_dir"], steps


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ranks")  # one base model cache for every run here


@pytest.fixture(scope="module")
def two_ranks(root):
    return _run(root, 2)


def _assert_same_step(a, b) -> None:
    """Every step's metrics and the final weights of runs a and b agree (to float rounding)."""
    (_, weights_a, _, steps_a), (_, weights_b, _, steps_b) = a, b
    assert len(steps_a) == len(steps_b)
    for step_a, step_b in zip(steps_a, steps_b):
        assert step_b["reward/mean"] == step_a["reward/mean"]  # the same rollout: the engines got the same weights
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
            assert step_b[key] == pytest.approx(step_a[key], rel=1e-4, abs=1e-6), key
    assert max((weights_b[k] - weights_a[k]).abs().max().item() for k in weights_a) < 1e-5


def test_two_trainer_ranks_equal_one(root, two_ranks):
    _assert_same_step(_run(root, 1), two_ranks)


@pytest.mark.slow  # about 3 minutes on 2 cores: two 2-step runs, the simulated cluster's nodes sharing the cores
def test_two_nodes_equal_one(root):
    from ray.cluster_utils import Cluster

    one_node = _run(root, 2, "train.steps=2", "name=one-node")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # two simulated nodes of one CPU each
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:  # the run joins the cluster itself; its trainer ranks and engine replicas are placed one per node
        two_nodes = _run(root, 2, "train.steps=2", f"cluster.address={cluster.address}", "cluster.num_cpus=null",
                         "name=two-nodes")
    finally:
        cluster.shutdown()
    with open(os.path.join(two_nodes[2], "log.txt")) as f:
        placed = next(line for line in f if "devices: 2;" in line)
    assert placed.count("cores 0") == 2 and len(set(re.findall(r"node (\w+) cores", placed))) == 2, placed
    _assert_same_step(one_node, two_nodes)  # both steps: the second rolls out with the synced weights


PPO_KL = ["algorithm.advantage=gae", "algorithm.kl_coef=0.1", "critic.lr=1e-3"]  # a critic and a reference too


@pytest.mark.slow  # two runs with four worker groups each
def test_two_rank_critic_and_reference_equal_one(root):
    """PPO with a critic and a KL term: the critic and the reference are groups of train.ranks ranks too, each
    its own process group, placed like the actor's. One step on 2 ranks gives the one-rank run's metrics."""
    one = _run(root, 1, *PPO_KL, "name=ppo-kl-1")
    two = _run(root, 2, *PPO_KL, "name=ppo-kl-2")
    _assert_same_step(one, two)
    # each 2-rank group met through its own rendezvous file in the run directory
    assert {".trainer-rendezvous", ".critic-rendezvous", ".reference-rendezvous"} <= set(os.listdir(two[2]))
    step_one, step_two = one[0], two[0]
    for key in ("critic/value_loss", "critic/grad_norm", "actor/kl", "advantage/abs_mean"):
        assert math.isfinite(step_two[key]), (key, step_two[key])
        assert step_two[key] == pytest.approx(step_one[key], rel=1e-4, abs=1e-6), key
    assert step_two["critic/value_loss"] > 0 and step_two["actor/kl"] > 0  # (the second mini-batch moved off the start)

"""One macro flow, three placements (issue 15), on 2 logical CPU devices: collocated (every role on both devices,
stage by stage), disaggregated (the rollout on device 0, the actor on device 1, rollout groups streamed through a
channel into the actor's update while the engine still generates) and hybrid (rollout and reference share device 0,
the actor has device 1). With the same seed and data they give the same samples, the same updates and the same
final weights (float rounding aside), and in the pipelined placements the timeline shows the actor training before
the last rollout group is done. Groups that share devices take turns on them (context switching), which the
memory ledger checks."""

from __future__ import annotations

import json
import os
import re

import pytest
from safetensors.torch import load_file

from m2flow.config import load_config
from m2flow.faults import StageError
from m2flow.gantt import bubble_fraction, report
from m2flow.runner import run
from m2flow.timeline import load_spans

from test_e2e_grpo import MICRO  # also registers the e2e_has_digit reward

# (MICRO turns context switching on, which CPU devices leave off by default)
# 8 prompts x 4 samples, 2 groups per micro-batch: 4 micro-batches stream into one optimizer step per iteration
FLOW = [o for o in MICRO if not o.startswith(("checkpoint.", "train.steps", "train.mini_batches", "train.prompts"))] + [
    "train.steps=2", "train.prompts_per_step=8", "train.mini_batches=1", "eval.num_problems=8", "checkpoint.every=0",
    "cluster.devices=2", "algorithm.kl_coef=0.01",  # a KL term: the reference is a group of its own
    "rollout.engine.max_num_seqs=4", "rollout.max_new_tokens=32"]  # one group at a time: they finish one by one
PLACEMENTS = {
    "collocated": "collocated",
    "disaggregated": "disaggregated",
    "hybrid": '{"rollout,inference": "0", "actor": "1"}',
}


def _run(root, name: str) -> dict:
    cfg = load_config(None, FLOW + [f"cluster.placement={PLACEMENTS[name]}", f"name={name}",
                                    f"output_dir={root / 'runs'}", f"base.cache_dir={root / 'cache'}"])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "actor/pg_loss" in r]
    weights = load_file(os.path.join(summary["final_checkpoint"], "model.safetensors"))
    return {"steps": steps, "weights": weights, "run_dir": summary["run_dir"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("placement")  # one base model for every run here


@pytest.fixture(scope="module")
def runs(root):
    return {name: _run(root, name) for name in PLACEMENTS}


@pytest.mark.parametrize("name", ["disaggregated", "hybrid"])
def test_placements_give_the_collocated_update(runs, name):
    want, got = runs["collocated"], runs[name]
    assert len(got["steps"]) == len(want["steps"]) == 2
    for a, b in zip(want["steps"], got["steps"]):
        assert b["reward/mean"] == a["reward/mean"]  # the same samples: the engines got the same weights at step 2
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/kl", "advantage/abs_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert max((got["weights"][k] - want["weights"][k]).abs().max().item() for k in want["weights"]) < 1e-5


def test_old_logprobs_come_from_the_inference_devices(runs, root):
    """train.old_logprobs=recompute with `inference` apart from the actor ({"rollout,inference": "0", actor: "1"}):
    an inference group on device 0 computes the old logprobs (its weights synced after every step, as the
    engines'), the actor computes none, and the update is the collocated one (whose old logprobs are the engine's,
    equal in float32 to rounding)."""
    cfg = load_config(None, FLOW + [f"cluster.placement={PLACEMENTS['hybrid']}", "train.old_logprobs=recompute",
                                    "name=inference-apart", f"output_dir={root / 'runs'}",
                                    f"base.cache_dir={root / 'cache'}"])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "actor/pg_loss" in r]
    for a, b in zip(runs["collocated"]["steps"], steps, strict=True):
        assert b["reward/mean"] == a["reward/mean"]
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    weights = load_file(os.path.join(summary["final_checkpoint"], "model.safetensors"))
    assert max((weights[k] - runs["collocated"]["weights"][k]).abs().max().item() for k in weights) < 1e-5
    spans = load_spans(os.path.join(summary["run_dir"], "timeline.jsonl"))
    for step in (1, 2):
        mine = [s for s in spans if s.step == step]
        assert sum(s.role == "inference" and s.stage == "logprobs" for s in mine) == 4  # one per micro-batch
        assert not any(s.role == "actor" and s.stage == "logprobs" for s in mine)
    assert {s.devices for s in spans if s.role == "inference"} == {"0"}
    assert any(s.role == "inference" and s.stage == "weight_sync" for s in spans)
    with open(os.path.join(summary["run_dir"], "log.txt")) as f:
        log = f.read()
    assert "a trainer pass on the inference devices" in log and "waits for the whole batch" not in log


def test_log_names_the_mode(runs):
    for name, mode in (("collocated", "collocated"), ("disaggregated", "disaggregated"), ("hybrid", "hybrid")):
        with open(os.path.join(runs[name]["run_dir"], "log.txt")) as f:
            line = next(x for x in f if "placement:" in x)
        assert line.rstrip().endswith(f"({mode})"), line


@pytest.mark.parametrize("name", ["disaggregated", "hybrid"])
def test_pipelined_actor_trains_before_the_last_rollout_group(runs, name):
    spans = [s for s in load_spans(os.path.join(runs[name]["run_dir"], "timeline.jsonl")) if s.step == 2]
    groups = [s.start for s in spans if s.role == "rollout" and s.stage == "group"]
    updates = [s for s in spans if s.role == "actor" and s.stage == "update"]
    assert len(groups) == 8 and len(updates) == 4  # every group, and one update call per micro-batch of 2 groups
    trainer_work = [s.start for s in spans if s.role in ("actor", "reference") and s.stage in ("logprobs", "update")]
    assert min(trainer_work) < max(groups)  # inference and training began while the rollout was still generating
    assert {s.devices for s in spans if s.role == "rollout"} == {"0"}
    assert {s.devices for s in spans if s.role == "actor"} == {"1"}


def _turns(spans) -> list[tuple[str, float, float]]:
    """(role, from its onload's start, to its offload's end): each turn a rank took on its shared devices."""
    out = []
    for role in {s.role for s in spans}:
        mine = sorted((s for s in spans if s.role == role and s.stage in ("onload", "offload")), key=lambda s: s.start)
        out += [(role, on.start, off.end) for on, off in zip(mine[::2], mine[1::2])]
        assert [s.stage for s in mine] == ["onload", "offload"] * (len(mine) // 2), role
    return out


def test_collocated_groups_take_turns_and_a_missing_offload_breaks_the_budget(runs, root):
    """Context switching, collocated: every group's work on the shared devices lies inside one of its turns (onload
    ... offload), the rollout's turns never overlap the training groups', and the memory ledger's peak per device is
    less than all groups' state together. The same run with cluster.context_switch=false, under a budget that peak fits in, fails in its first
    stage, naming the device and what each rank kept there."""
    spans = [s for s in load_spans(os.path.join(runs["collocated"]["run_dir"], "timeline.jsonl")) if s.step == 2]
    turns = _turns([s for s in spans if s.role != "driver"])
    assert {role for role, _, _ in turns} == {"rollout", "actor", "reference"}
    for s in spans:
        if s.stage in ("generate", "logprobs", "update", "weight_sync"):
            assert any(role == s.role and a <= s.start and s.end <= b for role, a, b in turns), s
    for ra, a0, a1 in [t for t in turns if t[0] == "rollout"]:
        for rb, b0, b1 in [t for t in turns if t[0] != "rollout"]:
            assert a1 <= b0 or b1 <= a0, (ra, rb)  # the rollout or the trainers, never both
    peak = max(step["memory/device0_ledger_gb"] for step in runs["collocated"]["steps"])
    assert peak > 0
    cfg = load_config(None, FLOW + ["cluster.placement=collocated", "cluster.context_switch=false",
                                    f"cluster.device_memory_gb={peak * 1.05}", "name=no-offload",
                                    f"output_dir={root / 'runs'}", f"base.cache_dir={root / 'cache'}"])
    with pytest.raises(StageError) as err:
        run(cfg, progress=False)
    message = str(err.value)
    assert re.search(r"DeviceBudgetError: device \d: after \w+ rank 0's \w+, its ranks keep [\d.]+ MiB, over its "
                     r"budget of [\d.]+ MiB", message), message
    # (which trainers it names depends on which had started by then: the groups start at once)
    assert "rollout rank 0 " in message and ("actor rank 0 " in message or "reference rank 0 " in message), message


def test_collocated_runs_stage_by_stage(runs):
    spans = [s for s in load_spans(os.path.join(runs["collocated"]["run_dir"], "timeline.jsonl")) if s.step == 2]
    generate_end = max(s.end for s in spans if s.role == "rollout" and s.stage == "generate")
    assert min(s.start for s in spans if s.role == "actor" and s.stage == "update") >= generate_end
    assert {s.devices for s in spans if s.role in ("rollout", "actor")} == {"0-1"}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_each_steps_memory_per_role_is_logged(runs, name):
    """Per phase, every rank's resident memory is on its spans, and each step logs each role's peak."""
    for step in runs[name]["steps"]:
        for role in ("rollout", "actor", "reference"):
            assert 0.05 < step[f"memory/{role}_rss_gb"] < 64, (role, step)
    spans = load_spans(os.path.join(runs[name]["run_dir"], "timeline.jsonl"))
    assert all(s.info["rss_gb"] > 0 for s in spans if s.end > s.start and s.role != "driver")


def test_report_draws_each_placement(runs):
    for name in PLACEMENTS:
        out = report(runs[name]["run_dir"])
        assert os.path.getsize(out["png"]) > 1000
        assert 0.0 <= out["bubble_fraction"] < 1.0
        assert set(out["busy_s"]) == {0, 1}
    # the sanity of the measure itself: busy time never exceeds the window on any device
    spans = [s for s in load_spans(os.path.join(runs["disaggregated"]["run_dir"], "timeline.jsonl")) if s.step == 2]
    b = bubble_fraction(spans)
    assert all(v <= b["window_s"] + 1e-9 for v in b["busy_s"].values())


@pytest.mark.slow  # about 2-3 minutes on 2 cores: three simulated nodes share them
def test_disaggregated_over_three_nodes_gives_the_one_node_result(runs, root, tmp_path):
    """A simulated 3-node Ray cluster (ray.cluster_utils.Cluster, one CPU each): the rollout on node 0's device,
    the actor and the reference as 2-rank groups over the devices of nodes 1 and 2, groups streamed across nodes
    through the channel. The same updates and final weights as the one-node collocated run."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        cfg = load_config(None, FLOW + ['cluster.placement={rollout: "0", actor: "1-2"}', "cluster.devices=3",
                                        "train.ranks=2", f"cluster.address={cluster.address}", "cluster.num_cpus=null",
                                        "name=three-nodes", f"output_dir={tmp_path / 'runs'}",
                                        f"base.cache_dir={root / 'cache'}"])
        summary = run(cfg, progress=False)
    finally:
        cluster.shutdown()
    with open(os.path.join(summary["run_dir"], "log.txt")) as f:
        log = f.read()
    assert "(disaggregated)" in log and len(set(re.findall(r"node (\w+) cores", log))) == 3
    spans = load_spans(os.path.join(summary["run_dir"], "timeline.jsonl"))
    assert {s.devices for s in spans if s.role == "actor"} == {"1", "2"}
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "actor/pg_loss" in r]
    weights = load_file(os.path.join(summary["final_checkpoint"], "model.safetensors"))
    want = runs["collocated"]
    for a, b in zip(want["steps"], steps):
        assert b["reward/mean"] == a["reward/mean"]
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert max((weights[k] - want["weights"][k]).abs().max().item() for k in weights) < 1e-5


def test_one_step_off_policy_overlaps_the_next_rollout_with_the_update(root):
    """algorithm.max_staleness=1, disaggregated: step k+1's samples are generated (by the weights of step k-1)
    while step k trains. Staleness 0 at step 1 (nothing to overlap yet), 1 after; the timeline shows the next
    step's generation running during this step's update; the run completes with its final checkpoint."""
    cfg = load_config(None, FLOW + ["train.steps=3", "cluster.placement=disaggregated", "algorithm.max_staleness=1",
                                    "name=off-policy", f"output_dir={root / 'runs'}", f"base.cache_dir={root / 'cache'}"])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "actor/pg_loss" in r]
    assert [s["rollout/staleness"] for s in steps] == [0.0, 1.0, 1.0]
    assert [s["rollout/policy_version"] for s in steps] == [0.0, 0.0, 1.0]
    spans = load_spans(os.path.join(summary["run_dir"], "timeline.jsonl"))
    third = next(s for s in spans if s.step == 3 and s.role == "rollout" and s.stage == "generate")
    second_updates = [s for s in spans if s.step == 2 and s.role == "actor" and s.stage == "update"]
    assert third.start < max(u.end for u in second_updates) and third.end > min(u.start for u in second_updates)
    assert os.path.isfile(os.path.join(summary["final_checkpoint"], "model.safetensors"))


def test_off_policy_needs_a_pipelined_placement():
    from m2flow.config import ConfigError

    with pytest.raises(ConfigError, match="max_staleness=1 .* needs cluster.placement disaggregated or hybrid"):
        load_config(None, ["algorithm.max_staleness=1"])
    with pytest.raises(ConfigError, match="max_staleness=1 needs a streamed pipeline, but train.epochs > 1"):
        load_config(None, ["algorithm.max_staleness=1", "cluster.placement=disaggregated", "train.epochs=2"])
    with pytest.raises(ConfigError, match="algorithm.max_staleness must be 0"):
        load_config(None, ["algorithm.max_staleness=2"])

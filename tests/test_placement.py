"""Placement specs in RLinf's syntax (issue 15): device sets per role, the derived mode, and one clear error for
each spec that cannot run."""

from __future__ import annotations

import pytest

from m2flow.scheduler.placement import PlacementError, plan_placement


def test_collocated_disaggregated_and_hybrid():
    plan = plan_placement({"actor,rollout,reward": "all"}, 4)
    assert plan.mode == "collocated" and set(plan.devices.values()) == {(0, 1, 2, 3)}
    plan = plan_placement({"rollout": "0-3", "inference": "4-5", "actor": "6-7"}, 8)  # RLinf's 7B layout
    assert plan.mode == "disaggregated"
    assert plan.devices == {"rollout": (0, 1, 2, 3), "reward": tuple(range(8)), "inference": (4, 5),
                            "actor": (6, 7), "critic": (6, 7)}  # the critic follows the actor, reward everywhere
    assert plan_placement({"rollout": "0-1", "actor": "2-3"}, 4).devices["inference"] == (2, 3)
    hybrid = plan_placement({"rollout,inference": "0-2", "actor": "3"}, 4)
    assert hybrid.mode == "hybrid" and hybrid.devices["inference"] == (0, 1, 2)
    assert plan_placement({"actor,rollout": "0-1,3", "reward": "2"}, 4).devices["rollout"] == (0, 1, 3)
    assert hybrid.describe().startswith("rollout: devices 0-2; reward: devices 0-3; inference: devices 0-2; "
                                        "actor: devices 3") and hybrid.describe().endswith("(hybrid)")


@pytest.mark.parametrize("spec, message", [
    ({"rollout": "0-3"}, "role 'actor' has no devices"),
    ({"actor,rollout": "all", "learner": "0"}, "unknown role 'learner'; roles: rollout, reward, inference, actor, critic"),
    ({"actor,rollout": "all", "actor": "0"}, "role 'actor' is given devices twice"),
    ({"actor,rollout": "0-4"}, r"devices '0-4' are not within the cluster's 4 devices \(0-3\)"),
    ({"actor,rollout": "3-1"}, r"devices '3-1' are not within"),
    ({"actor,rollout": "gpu0"}, r"'gpu0' is not a device set \('all', '3', '0-3', '0-1,4'\)"),
    ({"rollout": "0-2", "actor": "2-3"}, r"rollout \(devices 0-2\) and inference \(devices 2-3\) overlap without "
                                          r"sharing the same devices"),
])
def test_specs_that_cannot_run_are_one_clear_error(spec, message):
    with pytest.raises(PlacementError, match=message):
        plan_placement(spec, 4)

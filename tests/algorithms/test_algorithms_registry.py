import pytest

from m2flow.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, Registry


def test_register_get_names():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and reg.get("b")() == 2
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_unknown_name_lists_valid_names():
    reg = Registry("widget")
    reg.register("x")(lambda: 0)
    reg.register("y")(lambda: 0)
    with pytest.raises(ValueError) as e:
        reg.get("z")
    assert str(e.value) == "unknown widget 'z'; valid names: x, y"


def test_duplicate_registration_raises():
    reg = Registry("widget")
    reg.register("x")(lambda: 0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(lambda: 1)


def test_builtin_registries_populated():
    assert "grpo" in ADVANTAGE_ESTIMATORS.names()
    assert POLICY_LOSSES.names() == ["gspo", "ppo_clip"]
    assert KL_ESTIMATORS.names() == ["abs", "k1", "k2", "k3"]
    assert len(LOSS_AGGREGATIONS.names()) == 4
    with pytest.raises(ValueError, match="valid names: dr_grpo, grpo, reinforce_pp, reinforce_pp_baseline, rloo"):
        ADVANTAGE_ESTIMATORS.get("gae")  # a plain function: its signature differs

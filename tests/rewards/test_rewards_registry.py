"""Tests for the reward registry."""

from __future__ import annotations

import pytest

from m2flow.rewards import REWARDS, get_reward, math_reward, register_reward, score_responses


def test_builtins_registered() -> None:
    assert get_reward("math") is math_reward
    fmt = get_reward("boxed_format")
    assert fmt(r"so \boxed{3}", "4") == 1.0
    assert fmt("so 3", "3") == 0.0


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        get_reward("nope")
    message = str(info.value)
    assert "nope" in message and "'math'" in message and "'boxed_format'" in message


def test_custom_reward_via_decorator() -> None:
    @register_reward("test_length")
    def length_reward(response: str, ground_truth: str) -> float:
        return float(len(response) == len(ground_truth))

    try:
        assert get_reward("test_length") is length_reward
        assert score_responses(["ab", "abc"], ["xy", "xy"], reward_fn=get_reward("test_length")) == [1.0, 0.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_length")(lambda r, g: 0.0)
    finally:
        REWARDS.pop("test_length", None)

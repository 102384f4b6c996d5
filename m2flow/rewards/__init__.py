"""Rewards: math answer extraction and verification, plus a registry of reward functions."""

from __future__ import annotations

from m2flow.rewards.math import boxed_format_reward, extract_answer, math_reward, score_responses
from m2flow.rewards.registry import REWARDS, get_reward, register_reward

__all__ = [
    "REWARDS",
    "boxed_format_reward",
    "extract_answer",
    "get_reward",
    "math_reward",
    "register_reward",
    "score_responses",
]

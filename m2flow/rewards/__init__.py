"""Rewards: math answer extraction and verification, multiple choice, plus a registry of reward functions."""

from __future__ import annotations

from m2flow.rewards.math import (
    answers_equivalent,
    boxed_format_reward,
    extract_answer,
    math_reward,
    normalize_answer,
    score_responses,
)
from m2flow.rewards.multiple_choice import extract_choice, multiple_choice_reward
from m2flow.rewards.registry import REWARDS, get_reward, register_reward

__all__ = [
    "REWARDS",
    "answers_equivalent",
    "boxed_format_reward",
    "extract_answer",
    "extract_choice",
    "get_reward",
    "math_reward",
    "multiple_choice_reward",
    "normalize_answer",
    "register_reward",
    "score_responses",
]

"""Registry of reward functions: a dict plus a decorator.

A reward function is called as ``fn(response: str, ground_truth: str, *, format_penalty: float, timeout_s: float,
**more) -> float`` (the `reward.*` config values); accept ``**kwargs`` for options it does not use.
Users add their own with ``@register_reward("name")`` and look them up with ``get_reward("name")``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from m2flow.rewards.math import boxed_format_reward, math_reward
from m2flow.rewards.multiple_choice import multiple_choice_reward

RewardFn = Callable[..., float]
F = TypeVar("F", bound=RewardFn)

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[F], F]:
    """Decorator registering a reward function under ``name``; re-registering a name is an error."""

    def decorator(fn: F) -> F:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name]!r})")
        REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """Look up a reward function; an unknown name raises ``KeyError`` listing the valid names."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; valid names: {sorted(REWARDS)}") from None


register_reward("math")(math_reward)
register_reward("boxed_format")(boxed_format_reward)
register_reward("multiple_choice")(multiple_choice_reward)

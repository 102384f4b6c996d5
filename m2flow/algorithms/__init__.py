"""RL algorithms as pure tensor functions: advantages, policy losses, KL estimators, loss aggregation.

Each family has a registry (``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``, ``KL_ESTIMATORS``,
``LOSS_AGGREGATIONS``); look entries up with ``REG.get(name)`` and add your own with ``@REG.register(name)``.
"""

from __future__ import annotations

from .advantages import broadcast_to_tokens, dr_grpo_advantages, grpo_advantages, rloo_advantages
from .aggregation import aggregate_loss
from .kl import kl_abs, kl_k1, kl_k2, kl_k3
from .losses import entropy_from_logits, logprobs_from_logits, ppo_clip_loss
from .registry import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, Registry
from .utils import masked_mean, masked_sum

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "Registry",
    "aggregate_loss",
    "broadcast_to_tokens",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_abs",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "ppo_clip_loss",
    "rloo_advantages",
]

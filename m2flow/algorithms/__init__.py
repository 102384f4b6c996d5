"""RL algorithms as pure tensor functions: advantages, policy and value losses, KL estimators, loss
aggregation, batch filters and reward shaping.

Each pluggable family has a registry (``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``, ``KL_ESTIMATORS``,
``LOSS_AGGREGATIONS``); look entries up with ``REG.get(name)`` and add your own with ``@REG.register(name)``.
Functions with their own signatures (``gae_advantages``, ``value_loss``, the filters) are plain functions.
"""

from __future__ import annotations

from .advantages import (
    broadcast_to_tokens,
    discounted_returns,
    dr_grpo_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    whiten,
    whiten_advantages,
)
from .aggregation import aggregate_loss
from .critic import explained_variance, value_loss
from .filters import informative_groups, overlong_mask, scale_and_clip_rewards, soft_overlong_punishment
from .kl import kl_abs, kl_k1, kl_k2, kl_k3, kl_penalty_rewards
from .losses import entropy_from_logits, gspo_loss, logprobs_from_logits, ppo_clip_loss
from .registry import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, Registry
from .utils import masked_mean, masked_sum, masked_var, scores_to_token_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "Registry",
    "aggregate_loss",
    "broadcast_to_tokens",
    "discounted_returns",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "gspo_loss",
    "informative_groups",
    "kl_abs",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "overlong_mask",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "scale_and_clip_rewards",
    "scores_to_token_rewards",
    "soft_overlong_punishment",
    "value_loss",
    "whiten",
    "whiten_advantages",
]

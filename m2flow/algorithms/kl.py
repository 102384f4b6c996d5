"""Per-token KL estimators between the policy and a reference, from sampled-token log-probs.

Signature (``KL_ESTIMATORS``): ``fn(logprobs [B, T], ref_logprobs [B, T]) -> [B, T]`` (unmasked; reduce with
``aggregate_loss`` or ``masked_mean``). With samples drawn from the policy and r = p_ref / p, they estimate
KL(policy || ref): k1 = -log r (unbiased, high variance, can be negative), k2 = 0.5 (log r)^2 (biased, low
variance), k3 = r - 1 - log r (unbiased, low variance, always >= 0), abs = |log r|.

``kl_penalty_rewards`` turns one of them into a per-token reward penalty (KL in the reward rather than in the
loss).
"""

from __future__ import annotations

import torch

from .registry import KL_ESTIMATORS
from .utils import float_dtype, scores_to_token_rewards

LOG_RATIO_CLAMP = 20.0  # keeps exp() finite in k3


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_r = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_r) - log_r - 1


@KL_ESTIMATORS.register("abs")
def kl_abs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return (logprobs - ref_logprobs).abs()


def kl_penalty_rewards(
    token_rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """KL as a reward penalty (verl's ``use_kl_in_reward``): ``token_rewards - kl_coef * KL_t`` on the valid
    tokens, 0 elsewhere; [B, T] float32 (float64 if token_rewards are float64), carrying no gradient.

    ``token_rewards`` is [B, T], or per-sequence scores [B], which are first put on each sequence's last
    valid token (``scores_to_token_rewards``). ``logprobs`` [B, T] are the sampling policy's (the actor's
    old logprobs), ``ref_logprobs`` [B, T] the reference's; ``KL_t`` is the registered ``estimator``. The
    default k1 (``logprobs - ref_logprobs``) summed over a sequence is the unbiased estimate of the
    sequence's KL(policy || ref), the classic RLHF per-token penalty. The result feeds a token-level
    estimator (``reinforce_pp``, ``reinforce_pp_baseline``, ``gae_advantages``); use this *or* the KL loss
    term, not both.
    """
    if token_rewards.dim() == 1:
        token_rewards = scores_to_token_rewards(token_rewards, response_mask)
    kl = KL_ESTIMATORS.get(estimator)(logprobs.detach(), ref_logprobs.detach())
    rewards = token_rewards.detach().to(float_dtype(token_rewards)) - kl_coef * kl.to(float_dtype(token_rewards))
    return torch.where(response_mask.bool(), rewards, 0.0)

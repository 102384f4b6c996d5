"""Per-token KL estimators between the policy and a reference, from sampled-token log-probs.

Signature (``KL_ESTIMATORS``): ``fn(logprobs [B, T], ref_logprobs [B, T]) -> [B, T]`` (unmasked; reduce with
``aggregate_loss`` or ``masked_mean``). With samples drawn from the policy and r = p_ref / p, they estimate
KL(policy || ref): k1 = -log r (unbiased, high variance, can be negative), k2 = 0.5 (log r)^2 (biased, low
variance), k3 = r - 1 - log r (unbiased, low variance, always >= 0), abs = |log r|.
"""

from __future__ import annotations

import torch

from .registry import KL_ESTIMATORS

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

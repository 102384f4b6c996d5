"""Advantage estimators.

Registry convention (``ADVANTAGE_ESTIMATORS``), followed by every estimator (grpo, dr_grpo, rloo
now; reinforce++, gae later)::

    fn(scores: [B], group_ids: [B] int, *, response_mask: [B, T] | None = None, **options) -> [B] or [B, T]

Outcome-level estimators (grpo, dr_grpo, rloo) return one advantage per sequence ``[B]`` and may ignore
``response_mask``; token-level ones (gae, reinforce++ with per-token rewards) return ``[B, T]``, zero where
the mask is 0. Callers turn either into token advantages with ``broadcast_to_tokens``.
"""

from __future__ import annotations

import torch

from .registry import ADVANTAGE_ESTIMATORS


def _group_stats(x: torch.Tensor, gid: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-sample value of the ``reduce`` ("mean", "amax", "amin") of its group; gid is 0..G-1, x: [B]."""
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    out = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
    out = out.scatter_reduce(0, gid, x, reduce=reduce, include_self=False)
    return out[gid]


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    *,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO outcome advantage: ``(score - group mean) / (group std + eps)``, or without the division when
    ``norm_by_std`` is False. scores: [B] float; group_ids: [B] int, any values, any order (groups need not
    be contiguous). Returns [B] float32 (float64 if scores are float64).

    The std is the *population* std (``unbiased=False``: divide by the group size n, not n - 1), so a
    group's normalised advantages have unit variance. Groups of size 1 and groups whose scores are all
    equal get exactly 0 (never NaN). ``response_mask`` is accepted for the registry convention and unused.
    """
    x = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    gid = torch.unique(group_ids, return_inverse=True)[1].reshape(-1)
    x = x.reshape(-1)
    adv = x - _group_stats(x, gid, "mean")
    if norm_by_std:
        std = _group_stats(adv.square(), gid, "mean").sqrt()
        adv = adv / (std + eps)
    # all-equal groups (size 1 included) get exactly 0 rather than rounding noise amplified by 1/eps
    flat = _group_stats(x, gid, "amax") == _group_stats(x, gid, "amin")
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(scores.shape)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    **_options: object,
) -> torch.Tensor:
    """Dr. GRPO outcome advantage: ``score - group mean``, with no division by the group std (which biases
    updates towards groups that are nearly all right or all wrong). scores: [B]; group_ids: [B] int.
    Returns [B]; groups of size 1 and all-equal groups get exactly 0. ``response_mask`` and options meant
    for other estimators (e.g. ``norm_by_std``) are ignored."""
    return grpo_advantages(scores, group_ids, norm_by_std=False, response_mask=response_mask)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    **_options: object,
) -> torch.Tensor:
    """RLOO (leave-one-out) outcome advantage: ``A_i = r_i - mean of the other samples of its group``
    ``= n / (n - 1) * (r_i - group mean)`` for a group of size n. scores: [B]; group_ids: [B] int, any
    values and order. Returns [B] float32 (float64 if scores are float64); groups of size 1 (no other
    sample to form a baseline) get 0. ``response_mask`` and options meant for other estimators are ignored."""
    x = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32).reshape(-1)
    gid = torch.unique(group_ids, return_inverse=True)[1].reshape(-1)
    n = torch.bincount(gid).to(x.dtype)[gid]
    adv = (x - _group_stats(x, gid, "mean")) * n / (n - 1).clamp(min=1)
    flat = _group_stats(x, gid, "amax") == _group_stats(x, gid, "amin")
    return torch.where(flat | (n < 2), torch.zeros_like(adv), adv).reshape(scores.shape)


def broadcast_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token advantages [B, T] from per-sequence ``adv`` [B] (or already per-token [B, T]), zero where
    ``mask`` [B, T] is 0."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    return adv * mask.to(adv.dtype)

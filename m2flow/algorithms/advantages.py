"""Advantage estimators.

Registry convention (``ADVANTAGE_ESTIMATORS``), followed by every registered estimator::

    fn(scores: [B], group_ids: [B] int, *, response_mask: [B, T] | None = None, **options) -> [B] or [B, T]

Outcome-level estimators (grpo, dr_grpo, rloo) return one advantage per sequence ``[B]`` and may ignore
``response_mask``; token-level ones (reinforce_pp, reinforce_pp_baseline) need ``response_mask`` and return
``[B, T]``, zero where the mask is 0. Callers turn either into token advantages with ``broadcast_to_tokens``.
Options meant for other estimators are swallowed, so a caller can pass one set of options to any of them.

GAE needs per-token rewards and critic values, so it is the plain function ``gae_advantages`` rather than a
registry entry. ``whiten`` / ``whiten_advantages`` normalise over all valid tokens of the batch.
"""

from __future__ import annotations

import torch

from .registry import ADVANTAGE_ESTIMATORS
from .utils import (
    float_dtype,
    group_all_equal,
    group_index,
    group_reduce,
    masked_mean,
    masked_sum,
    masked_var,
    scores_to_token_rewards,
)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    *,
    response_mask: torch.Tensor | None = None,
    **_options: object,
) -> torch.Tensor:
    """GRPO outcome advantage: ``(score - group mean) / (group std + eps)``, or without the division when
    ``norm_by_std`` is False. scores: [B] float; group_ids: [B] int, any values, any order (groups need not
    be contiguous). Returns [B] float32 (float64 if scores are float64).

    The std is the *population* std (``unbiased=False``: divide by the group size n, not n - 1), so a
    group's normalised advantages have unit variance. Groups of size 1 and groups whose scores are all
    equal get exactly 0 (never NaN). ``response_mask`` is accepted for the registry convention and unused,
    and options meant for other estimators (e.g. ``gamma``, ``token_rewards``) are ignored.
    """
    x = scores.to(float_dtype(scores))
    gid = group_index(group_ids)
    x = x.reshape(-1)
    adv = x - group_reduce(x, gid, "mean")
    if norm_by_std:
        std = group_reduce(adv.square(), gid, "mean").sqrt()
        adv = adv / (std + eps)
    # all-equal groups (size 1 included) get exactly 0 rather than rounding noise amplified by 1/eps
    flat = group_all_equal(x, gid)
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
    x = scores.to(float_dtype(scores)).reshape(-1)
    gid = group_index(group_ids)
    n = torch.bincount(gid).to(x.dtype)[gid]
    adv = (x - group_reduce(x, gid, "mean")) * n / (n - 1).clamp(min=1)
    flat = group_all_equal(x, gid)
    return torch.where(flat | (n < 2), torch.zeros_like(adv), adv).reshape(scores.shape)


def broadcast_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token advantages [B, T] from per-sequence ``adv`` [B] (or already per-token [B, T]), zero where
    ``mask`` [B, T] is 0."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    return adv * mask.to(adv.dtype)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Batch whitening over the valid tokens: values [B, T] (or [B]), mask of the same shape -> same shape,
    float32 (float64 if values are float64), 0 where the mask is 0.

    ``shift_mean=True``: ``(x - mean) / (std + eps)``; ``shift_mean=False``: ``x / (std + eps)``, rescaled
    but not re-centred (so a 0 stays exactly 0 and no sign flips; verl's shift_mean=False instead adds the
    mean back after centring). mean and std are over all valid entries of the batch; the std is the
    *population* std (divide by n, not n - 1), as in ``grpo_advantages``, so the valid outputs of
    shift_mean=True have exactly unit variance. A constant input (all valid entries equal, or fewer than 2)
    has no spread to divide by: it becomes exactly 0 (shift_mean) or is returned as is. Masked entries are
    ignored even when they hold inf/NaN.
    """
    x = values.to(float_dtype(values))
    valid = mask.bool().expand_as(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(valid, x, zero)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    flat = ~(torch.where(valid, x, -inf).amax() > torch.where(valid, x, inf).amin())  # also: nothing valid
    std = masked_var(x, valid).sqrt()
    if shift_mean:
        out = torch.where(flat, zero, (x - masked_mean(x, valid)) / (std + eps))
    else:
        out = torch.where(flat, x, x / (std + eps))
    return torch.where(valid, out, zero)


def whiten_advantages(
    advantages: torch.Tensor, response_mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Any estimator's output, [B] or [B, T], broadcast to tokens [B, T] and whitened over all valid tokens
    of the batch (see ``whiten``). What a runner applies when ``algorithm.whiten_advantages`` is on. Being
    token-level, a long sequence weighs more in the batch mean/std than a short one."""
    return whiten(broadcast_to_tokens(advantages, response_mask), response_mask, shift_mean=shift_mean, eps=eps)


def discounted_returns(token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = r_t + gamma * G_next`` over the valid tokens: token_rewards [B, T], response_mask
    [B, T] -> [B, T], 0 where the mask is 0. Masked positions (padding, or tool output inside a response)
    are skipped: they neither earn reward nor count as a discount step. With gamma = 1 and an outcome score
    on the last token, every valid token's return is the score. (GAE with zero values and lam = 1.)"""
    return gae_advantages(token_rewards, torch.zeros_like(token_rewards), response_mask, gamma, lam=1.0)[0]


def _require_mask(response_mask: torch.Tensor | None, name: str) -> torch.Tensor:
    if response_mask is None:
        raise ValueError(f"advantage estimator {name!r} is token-level and needs response_mask [B, T]")
    return response_mask


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    eps: float = 1e-8,
    **_options: object,
) -> torch.Tensor:
    """REINFORCE++: per-token return-to-go (``discounted_returns`` with ``gamma``) of the token rewards,
    whitened over all valid tokens of the batch (``whiten``, shift_mean). No critic and no group baseline;
    ``group_ids`` is unused, so it works with one sample per prompt.

    Token rewards default to the outcome score [B] on each sequence's last valid token
    (``scores_to_token_rewards``). Pass ``token_rewards`` [B, T] to use your own, e.g. with a per-token KL
    penalty from ``kl_penalty_rewards``; they must already contain the score, and ``scores`` is then
    ignored. Returns [B, T], 0 on masked tokens; a batch whose valid returns are all equal gets exactly 0.
    """
    mask = _require_mask(response_mask, "reinforce_pp")
    rewards = scores_to_token_rewards(scores, mask) if token_rewards is None else token_rewards
    return whiten(discounted_returns(rewards, mask, gamma), mask, shift_mean=True, eps=eps)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    shift_mean: bool = False,
    eps: float = 1e-8,
    **_options: object,
) -> torch.Tensor:
    """REINFORCE++-baseline: ``score - group mean`` (as dr_grpo), broadcast to the valid tokens, then divided
    by the std over all valid tokens of the batch (``whiten``). Returns [B, T], 0 on masked tokens.

    With ``token_rewards`` [B, T] given (e.g. with a KL penalty), a sequence's score is the sum of its
    valid token rewards and ``scores`` is ignored. By default the batch whitening does not re-centre
    (``shift_mean=False``), so all-equal groups and singletons keep exactly 0 and no sample changes sign
    relative to its group; ``shift_mean=True`` also subtracts the batch token mean, as verl and OpenRLHF do.
    """
    mask = _require_mask(response_mask, "reinforce_pp_baseline")
    if token_rewards is not None:
        scores = masked_sum(token_rewards.to(float_dtype(token_rewards)), mask, dim=-1)
    centred = dr_grpo_advantages(scores, group_ids)
    return whiten(broadcast_to_tokens(centred, mask), mask, shift_mean=shift_mean, eps=eps)


def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens: token_rewards, values (critic, detached),
    response_mask, all [B, T] -> (advantages [B, T], returns [B, T]), both 0 on masked tokens.

    ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = delta_t + gamma * lam * A_next``, where "next" is
    the next *valid* token (masked positions are skipped) and ``V_next = 0`` after the last valid token.
    ``returns = A + V`` are the critic's regression targets. gamma = lam = 1 gives ``A_t = G_t - V_t``
    (Monte Carlo return minus value). Advantages are not whitened: PPO usually whitens them with
    ``whiten(advantages, response_mask)``.

    Build ``token_rewards`` as the outcome score on the last valid token, ``scores_to_token_rewards(scores,
    response_mask)``, optionally with a per-token KL penalty: ``kl_penalty_rewards(that, old_logprobs,
    ref_logprobs, response_mask, kl_coef, "k1")``.
    """
    valid = response_mask.bool()
    dtype = float_dtype(token_rewards)
    r = torch.where(valid, token_rewards.to(dtype), 0.0)
    v = torch.where(valid, values.detach().to(dtype), 0.0)
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = torch.where(valid[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        adv[:, t] = running
    adv = torch.where(valid, adv, 0.0)
    return adv, torch.where(valid, adv + v, 0.0)

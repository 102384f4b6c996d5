"""Masked reductions and small tensor helpers shared by the algorithm modules.

``mask`` is 0/1 (bool or numeric) and broadcastable to ``x``; masked entries of ``x`` are ignored even when
they hold inf/NaN, and an all-zero mask gives 0 (never NaN)."""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.bool().expand_as(x).sum() if dim is None else mask.bool().expand_as(x).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divide by n, not n - 1) of the valid entries of ``x``; 0 when fewer than one."""
    dev = x - masked_mean(x, mask)
    return masked_mean(dev.square(), mask)


def group_reduce(x: torch.Tensor, gid: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-sample value of the ``reduce`` ("mean", "amax", "amin") of its group; x: [B], gid: [B] in 0..G-1."""
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    out = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
    out = out.scatter_reduce(0, gid, x, reduce=reduce, include_self=False)
    return out[gid]


def group_all_equal(x: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    """Per-sample bool [B]: True where every value of its group is equal (singletons included); x: [B],
    gid: [B] in 0..G-1. Such groups carry no group-relative signal."""
    return group_reduce(x, gid, "amax") == group_reduce(x, gid, "amin")


def group_index(group_ids: torch.Tensor) -> torch.Tensor:
    """Arbitrary group ids [B] (any values, any order) -> dense ids 0..G-1, [B] long."""
    return torch.unique(group_ids, return_inverse=True)[1].reshape(-1)


def float_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (the dtype every estimator returns)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def scores_to_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards [B, T] holding each sequence's score [B] on its last valid token and 0 elsewhere
    (outcome reward). "Last valid" is the right-most position where ``response_mask`` [B, T] is 1, so holes
    inside a response are fine; a row with no valid token gets no reward at all."""
    valid = response_mask.bool()
    pos = torch.arange(valid.shape[-1], device=valid.device)
    last = torch.where(valid, pos, -1).amax(-1, keepdim=True)  # [B, 1], -1 for an empty row
    x = scores.to(float_dtype(scores)).reshape(-1, 1)
    return torch.where(pos == last, x, torch.zeros((), dtype=x.dtype, device=x.device))

"""Masked reductions. ``mask`` is 0/1 (bool or numeric) and broadcastable to ``x``; masked entries of ``x``
are ignored even when they hold inf/NaN, and an all-zero mask gives 0 (never NaN)."""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.bool().expand_as(x).sum() if dim is None else mask.bool().expand_as(x).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)

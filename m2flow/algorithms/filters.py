"""Batch filters and reward shaping (DAPO-style), as plain functions over tensors.

- ``informative_groups``: keep groups whose rewards differ (dynamic sampling / group filtering).
- ``overlong_mask``: drop truncated responses from the loss (overlong filtering).
- ``soft_overlong_punishment``: a length penalty that ramps up over a buffer before the length cap.
- ``scale_and_clip_rewards``: affine scaling and symmetric clipping of scores.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .utils import group_all_equal, group_index


def informative_groups(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask [B]: True for samples whose group's scores [B] are not all equal. All-equal groups (all
    right or all wrong) and singletons have zero group-relative advantage and give no policy gradient.
    group_ids: [B], any values and order. Scores are expected finite."""
    gid = group_index(group_ids)
    x = scores.reshape(-1)
    return (~group_all_equal(x, gid)).reshape(scores.shape)


def overlong_mask(truncated: torch.Tensor | Sequence[str], response_mask: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: ``response_mask`` [B, T] with the rows of truncated responses zeroed, so they
    contribute no loss (a cut-off answer is not evidence that the reasoning was wrong). ``truncated`` is a
    bool tensor [B] or the samples' finish reasons, where "length" means truncated. Same dtype as the mask."""
    if not isinstance(truncated, torch.Tensor):
        truncated = torch.tensor([reason == "length" for reason in truncated], dtype=torch.bool)
    keep = ~truncated.to(device=response_mask.device, dtype=torch.bool).reshape(-1, 1)
    return response_mask * keep.to(response_mask.dtype)


def soft_overlong_punishment(
    lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term added to the scores: lengths [B] (valid response
    tokens) -> [B] float32. With ``L = max_len - buffer_len``: 0 for ``length <= L``, then linear
    ``-penalty_factor * (length - L) / buffer_len`` down to ``-penalty_factor`` at ``max_len``, and
    ``-penalty_factor`` beyond. ``max_len`` is the generation cap (rollout.max_new_tokens); needs
    ``0 < buffer_len <= max_len``."""
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    excess = (lengths.to(torch.float32) - (max_len - buffer_len)) / buffer_len
    return -penalty_factor * excess.clamp(0.0, 1.0)


def scale_and_clip_rewards(scores: torch.Tensor, scale: float = 1.0, clip: float | None = None) -> torch.Tensor:
    """``clamp(scores * scale, -clip, clip)``: scores [B] -> [B]; scaling first, then clipping; ``clip=None``
    does not clip (must be > 0 otherwise)."""
    out = scores * scale
    if clip is None:
        return out
    if not clip > 0:
        raise ValueError(f"clip must be > 0 (or None), got {clip}")
    return out.clamp(-clip, clip)

"""The critic's loss: PPO-style clipped value regression, and the explained-variance diagnostic."""

from __future__ import annotations

import torch

from .aggregation import aggregate_loss
from .utils import masked_mean, masked_var


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range_value: float | None = None,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: values (critic, with grad), old_values (critic at rollout time), returns (targets,
    e.g. from ``gae_advantages``), response_mask, all [B, T] -> (scalar loss, metrics).

    Per token ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with ``V_clip = V_old + clip(V - V_old, -c, c)``, so
    the critic cannot move more than ``c = clip_range_value`` from its rollout-time value in the direction
    that helps (the pessimistic bound); ``None`` gives the plain ``0.5 * (V - R)^2``. Reduced with
    ``aggregate_loss(loss_agg)``. Gradients flow through ``values`` only.

    Metrics (floats, over valid tokens): ``vf_clip_frac``, the fraction where the clipped error is strictly
    larger (those tokens get no gradient; 0 without clipping); ``vf_explained_var`` (see
    ``explained_variance``); ``vf_values_mean``.
    """
    valid = response_mask.bool()
    returns = torch.where(valid, returns.detach(), 0.0)  # junk (even NaN) on masked tokens must not reach grads
    old_values = torch.where(valid, old_values.detach(), 0.0)
    err_unclipped = (values - returns).square()
    loss_mat = err_unclipped
    clipped = torch.zeros_like(err_unclipped, dtype=torch.bool)
    if clip_range_value is not None:
        if not clip_range_value > 0:
            raise ValueError(f"clip_range_value must be > 0 (or None), got {clip_range_value}")
        v_clip = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
        err_clipped = (v_clip - returns).square()
        loss_mat = torch.maximum(err_unclipped, err_clipped)
        clipped = err_clipped > err_unclipped
    loss = 0.5 * aggregate_loss(loss_mat, response_mask, loss_agg)
    with torch.no_grad():
        metrics = {
            "vf_clip_frac": masked_mean(clipped.float(), response_mask).item(),
            "vf_explained_var": explained_variance(values, returns, response_mask).item(),
            "vf_values_mean": masked_mean(values, response_mask).item(),
        }
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the valid tokens (population variances): 1 for a perfect critic, 0
    for one no better than predicting the mean return, negative for worse. values, returns, mask: [B, T] ->
    scalar; 0 when the returns have no variance (never NaN)."""
    values, returns = values.detach(), returns.detach()
    var_r = masked_var(returns, response_mask)
    ev = 1 - masked_var(returns - values, response_mask) / var_r.clamp(min=torch.finfo(var_r.dtype).tiny)
    return torch.where(var_r > 0, ev, torch.zeros_like(ev))

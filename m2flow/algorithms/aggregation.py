"""Loss aggregation: reduce a per-token loss matrix ``loss_mat [B, T]`` with ``mask [B, T]`` to a scalar.

- ``token-mean``: sum over all valid tokens / number of valid tokens (long sequences weigh more).
- ``seq-mean-token-mean``: mean over tokens within each sequence, then mean over sequences.
- ``seq-mean-token-sum``: sum over tokens within each sequence, then mean over sequences.
- ``seq-mean-token-sum-norm`` (Dr. GRPO): sum over all valid tokens / (number of sequences * T), where the
  constant normaliser T is the number of columns of ``loss_mat`` (the max length), so no sequence's tokens
  are down-weighted for the sequence being long.

Sequences with no valid token are left out of the sequence means; an all-masked batch gives 0.
"""

from __future__ import annotations

import torch

from .registry import LOSS_AGGREGATIONS
from .utils import masked_mean, masked_sum


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(loss_mat, mask)


def _seq_mean(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(per_seq, mask.bool().any(-1))


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _seq_mean(masked_mean(loss_mat, mask, dim=-1), mask)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _seq_mean(masked_sum(loss_mat, mask, dim=-1), mask)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO's constant normaliser: ``sum of valid tokens / (n_seq * T)`` with T = ``loss_mat.shape[-1]``.
    Like the other sequence means, n_seq counts only rows with at least one valid token; 0 if none."""
    n_seq = mask.bool().expand_as(loss_mat).any(-1).sum().clamp(min=1)
    return masked_sum(loss_mat, mask) / (n_seq * loss_mat.shape[-1]).to(loss_mat.dtype)


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce ``loss_mat [B, T]`` under ``mask [B, T]`` with the ``mode`` registered in LOSS_AGGREGATIONS."""
    return LOSS_AGGREGATIONS.get(mode)(loss_mat, mask)

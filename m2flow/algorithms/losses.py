"""Policy losses, and log-prob / entropy helpers over logits.

Signature (``POLICY_LOSSES``)::

    fn(logprobs [B, T], old_logprobs [B, T], advantages [B, T], response_mask [B, T], **options)
        -> (loss: scalar tensor with grad, metrics: dict[str, float])
"""

from __future__ import annotations

import torch

from .aggregation import aggregate_loss
from .kl import kl_k3
from .registry import POLICY_LOSSES
from .utils import masked_mean

LOG_RATIO_CLAMP = 20.0  # keeps exp(logprobs - old_logprobs) finite
# built-in losses whose every token's loss is the advantage times a factor (clipping, dual-clip and the TIS weight
# included): a sequence with advantage 0 everywhere adds nothing to them or to their gradient
ADVANTAGE_LINEAR_LOSSES = ("ppo_clip", "gspo")


def _tis_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor | None,
    tis_cap: float | None,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance sampling against the rollout engine: per-token ``min(exp(old_logprobs -
    rollout_logprobs), tis_cap)`` [B, T], detached (log-ratio clamped to +-20), and its metrics
    ``tis_weight_mean`` and ``tis_capped_frac`` (valid tokens whose raw weight exceeds the cap). It corrects
    for the engine sampling from a slightly different distribution than the trainer computes (kernels,
    precision). ``tis_cap=None`` gives (None, {}), i.e. no weighting."""
    if tis_cap is None:
        return None, {}
    if not tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0 (or None), got {tis_cap}")
    if rollout_logprobs is None:
        raise ValueError("tis_cap is set but rollout_logprobs is None: pass the rollout engine's logprobs")
    with torch.no_grad():
        log_w = (old_logprobs - rollout_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        raw = torch.exp(log_w)
        weights = raw.clamp(max=tis_cap)
        metrics = {
            "tis_weight_mean": masked_mean(weights, response_mask).item(),
            "tis_capped_frac": masked_mean((raw > tis_cap).float(), response_mask).item(),
        }
    return weights, metrics


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_ratio_low: float,
                       clip_ratio_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token ``max(-A * r, -A * clip(r, 1 - low, 1 + high))`` [B, T], and where the clipped branch is
    strictly larger (clipping changed the loss: no gradient there), for ppo_clip and gspo alike."""
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    return torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    loss_agg: str = "token-mean",
    clip_ratio_c: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate: per token ``max(-A * r, -A * clip(r, 1 - low, 1 + high))`` with
    ``r = exp(logprobs - old_logprobs)`` (log-ratio clamped to +-20), reduced with ``aggregate_loss``.
    Gradients flow through ``logprobs`` only.

    Metrics (floats, over valid tokens): ``clip_frac``, the fraction where the clipped branch is strictly
    larger (clipping changed the loss, so the token gets no gradient); ``approx_kl``, the k3 estimate of
    KL(old || new) = mean(r - 1 - log r), unbiased since the tokens were sampled from the old policy;
    ``ratio_mean``.

    Dual-clip: with ``clip_ratio_c`` set (must be > 1), tokens with negative advantage have their loss
    capped at ``-A * clip_ratio_c``, i.e. ``min(clipped loss, -A * c)``, so a huge ratio on a bad token
    cannot blow up the loss (such capped tokens get no gradient). Adds the metric ``dual_clip_frac``, the
    fraction of valid tokens where the cap is strictly smaller. ``None`` (default) leaves PPO unchanged.

    Truncated importance sampling: with ``tis_cap`` set, each token's loss is multiplied by the detached
    weight ``min(exp(old_logprobs - rollout_logprobs), tis_cap)`` (``rollout_logprobs`` [B, T] from the
    rollout engine, required then); adds ``tis_weight_mean`` and ``tis_capped_frac``. ``None`` (default)
    leaves PPO unchanged.
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 (or None), got {clip_ratio_c}")
    tis, tis_metrics = _tis_weights(old_logprobs, rollout_logprobs, tis_cap, response_mask)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    loss_mat, clipped = _clipped_surrogate(ratio, adv, clip_ratio_low, clip_ratio_high)
    dual_clipped = None
    if clip_ratio_c is not None:
        loss_cap = -adv * clip_ratio_c
        dual_clipped = (adv < 0) & (loss_cap < loss_mat)
        loss_mat = torch.where(dual_clipped, loss_cap, loss_mat)
    if tis is not None:
        loss_mat = loss_mat * tis
    loss = aggregate_loss(loss_mat, response_mask, loss_agg)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clipped.float(), response_mask).item(),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), response_mask).item(),
            "ratio_mean": masked_mean(ratio, response_mask).item(),
        }
        if dual_clipped is not None:
            metrics["dual_clip_frac"] = masked_mean(dual_clipped.float(), response_mask).item()
    return loss, metrics | tis_metrics


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    loss_agg: str = "seq-mean-token-mean",
    clip_ratio_c: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (group sequence policy optimisation): PPO's clipped surrogate with the *sequence* importance
    ratio ``s_i = exp(mean over valid tokens of (logprobs - old_logprobs))``, the length-normalised
    likelihood ratio, in place of the token ratio. Shapes as ``ppo_clip``; returns (loss, metrics).

    Token-level form (the paper's GSPO-token): ``s_it = sg[s_i] * exp(logprobs_t - sg[logprobs_t])``, which
    equals s_i in value while each token's gradient is s_i times its own log-prob gradient, so with a
    per-sequence advantage and ``seq-mean-token-mean`` the gradient is exactly that of the sequence-level
    objective ``-A_i * s_i``. Per token ``max(-A * s, -A * clip(s, 1 - low, 1 + high))``, reduced with
    ``loss_agg``: ``seq-mean-token-mean`` (default) gives each sequence one vote, as GSPO defines it.

    Clip ranges are on the sequence ratio, which moves far less than token ratios: the paper uses
    ``clip_ratio_low=3e-4``, ``clip_ratio_high=4e-4`` (the defaults here; the config's PPO defaults of 0.2
    would almost never clip). Dual-clip is not defined for GSPO (``clip_ratio_c`` must be None). Truncated
    importance sampling (``rollout_logprobs``, ``tis_cap``) works as in ``ppo_clip``.

    Metrics: ``clip_frac`` and ``approx_kl`` (k3 of the token ratios) over valid tokens, as in ppo_clip;
    ``ratio_mean``, the mean sequence ratio over sequences with a valid token.
    """
    if clip_ratio_c is not None:
        raise ValueError("clip_ratio_c (dual-clip) is not defined for gspo; leave it None")
    tis, tis_metrics = _tis_weights(old_logprobs, rollout_logprobs, tis_cap, response_mask)
    seq_log_ratio = masked_mean(logprobs - old_logprobs.detach(), response_mask, dim=-1)  # [B]
    log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T], s_i in value
    loss_mat, clipped = _clipped_surrogate(ratio, advantages.detach(), clip_ratio_low, clip_ratio_high)
    if tis is not None:
        loss_mat = loss_mat * tis
    loss = aggregate_loss(loss_mat, response_mask, loss_agg)
    with torch.no_grad():
        seq_ratio = torch.exp(seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        metrics = {
            "clip_frac": masked_mean(clipped.float(), response_mask).item(),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), response_mask).item(),
            "ratio_mean": masked_mean(seq_ratio, response_mask.bool().any(-1)).item(),
        }
    return loss, metrics | tis_metrics


def _rowwise(fn, logits: torch.Tensor, *rest: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Apply ``fn(logits_rows [N, V] float32, *rest_rows [N]) -> [N]`` over chunks of the flattened leading
    dims, so the float32 copy and softmax temporaries never exceed ``chunk_rows x V``."""
    flat = logits.reshape(-1, logits.shape[-1])
    rest = [r.reshape(-1) for r in rest]
    outs = [
        fn(flat[i : i + chunk_rows].float(), *(r[i : i + chunk_rows] for r in rest))
        for i in range(0, flat.shape[0], chunk_rows)
    ]
    out = torch.cat(outs) if outs else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """log softmax(logits)[token]: logits [B, T, V], tokens [B, T] int -> [B, T] float32. Gathers the
    token logit and subtracts logsumexp, never materialising the full log-softmax."""

    def fn(rows: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        return rows.gather(-1, toks.long().unsqueeze(-1)).squeeze(-1) - rows.logsumexp(-1)

    return _rowwise(fn, logits, tokens, chunk_rows=chunk_rows)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """Entropy of softmax(logits): logits [B, T, V] -> [B, T] float32, as logsumexp(l) - sum(softmax(l) * l)."""

    def fn(rows: torch.Tensor) -> torch.Tensor:
        return rows.logsumexp(-1) - (torch.softmax(rows, -1) * rows).sum(-1)

    return _rowwise(fn, logits, chunk_rows=chunk_rows)

"""The stages between rollout and update, as plain functions of tensors and the config (tested one by one):
shaping and filtering a generation round, dynamic sampling, advantages, and the batch's metrics."""

from __future__ import annotations

import dataclasses

import torch

from m2flow.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    gae_advantages,
    informative_groups,
    kl_penalty_rewards,
    masked_mean,
    overlong_mask,
    scale_and_clip_rewards,
    scores_to_token_rewards,
    soft_overlong_punishment,
    whiten_advantages,
)
from m2flow.batch import RolloutBatch
from m2flow.config import Config


@dataclasses.dataclass
class Round:
    """One generation round of a step (a step has several with dynamic sampling)."""

    batch: RolloutBatch  # scores shaped, response mask overlong-filtered, group ids unique within the step
    samples: list  # the engine's Samples, in batch order
    raw_scores: torch.Tensor  # [B] the reward function's scores before shaping
    lengths: torch.Tensor  # [B] response tokens, before overlong filtering
    overlong_penalty: torch.Tensor | None  # [B] soft overlong punishment added to the scores (None: off)
    timeouts: int = 0  # responses whose scoring ran past reward.timeout_s (scored -reward.format_penalty)


@dataclasses.dataclass
class Micro:
    """A micro-batch on its way from the rollout to the update: the whole step's batch in a collocated placement,
    a few groups in a pipelined one."""

    rows: RolloutBatch | None  # kept rows, scored and shaped (None: no rows, only the mini-batch's end)
    step_after: bool = True  # the optimizer steps once these rows' gradients are in (the end of a mini-batch)
    check: bool = False  # the trainer also computes these rows' logprobs, to compare with the engine's


def round_seed(seed: int, step: int, r: int) -> int:
    """Sampling seed of round r of a step; round 0 keeps the seed a step had before dynamic sampling."""
    return seed * 1_000_003 + step + r * (1 << 32)


def shape_rewards(scores: torch.Tensor, lengths: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reward shaping of scores [B] given response lengths [B]: DAPO's soft overlong punishment
    (reward.overlong_buffer > 0), then reward.scale and reward.clip. Returns (shaped scores, the overlong
    penalty or None). With the defaults the scores come back unchanged (the same tensor)."""
    rw = cfg.reward
    penalty = None
    if rw.overlong_buffer > 0:
        penalty = soft_overlong_punishment(lengths, cfg.rollout.max_new_tokens, rw.overlong_buffer, rw.overlong_penalty)
        scores = scores + penalty
    if rw.scale != 1.0 or rw.clip is not None:
        scores = scale_and_clip_rewards(scores, rw.scale, rw.clip)
    return scores, penalty


def prepare_round(batch: RolloutBatch, samples, raw_scores: torch.Tensor, cfg: Config, group_offset: int = 0,
                  timeouts: int = 0) -> Round:
    """A freshly generated and scored batch, ready for the group filter: scores shaped, truncated responses
    masked out of the loss (algorithm.overlong_filter), group ids offset so rounds of one step never share one."""
    lengths = batch.response_mask.sum(1)
    batch.group_ids = batch.group_ids + group_offset
    batch.scores, penalty = shape_rewards(raw_scores, lengths, cfg)
    if cfg.algorithm.overlong_filter:
        batch.response_mask = overlong_mask([s.finish_reason for s in samples], batch.response_mask)
    return Round(batch, samples, raw_scores, lengths, penalty, timeouts)


def informative_rows(batch: RolloutBatch) -> torch.Tensor:
    """Row indices [K] of the samples whose group's scores differ: the others have zero group-relative
    advantage and no policy gradient."""
    return informative_groups(batch.scores, batch.group_ids).nonzero().reshape(-1)


def _first_groups(batch: RolloutBatch, k: int) -> RolloutBatch:
    """The rows of the first k groups, in order of first appearance."""
    keep = set(list(dict.fromkeys(batch.group_ids.tolist()))[:k])  # dict keys keep first-appearance order
    return batch.select(torch.tensor([i for i, g in enumerate(batch.group_ids.tolist()) if g in keep],
                                     dtype=torch.long))


def collect_batch(generate_round, cfg: Config, pad_token_id: int) -> tuple[list[Round], RolloutBatch, dict]:
    """The training batch of one step. Without algorithm.filter_groups: one round, every sample. With it:
    the informative groups of up to algorithm.dynamic_sampling_max_tries rounds (`generate_round(r) -> Round`),
    stopping once train.prompts_per_step groups are kept, and cut to that many (DAPO dynamic sampling). If the
    tries run out first, the step trains on the groups it has. Returns (rounds, train batch, metrics)."""
    a, want = cfg.algorithm, cfg.train.prompts_per_step
    if not a.filter_groups:
        first = generate_round(0)
        return [first], first.batch, {}
    rounds, kept, n_kept = [], [], 0
    for r in range(a.dynamic_sampling_max_tries):
        rounds.append(generate_round(r))
        part = rounds[-1].batch.select(informative_rows(rounds[-1].batch))
        kept.append(part)
        n_kept += len(torch.unique(part.group_ids))
        if n_kept >= want:
            break
    train = RolloutBatch.concat(kept, pad_token_id)
    if n_kept > want:
        train = _first_groups(train, want)
    generated = sum(len(torch.unique(r.batch.group_ids)) for r in rounds)
    metrics = {"batch/sampling_rounds": float(len(rounds)),
               "batch/dropped_groups": float(generated - n_kept),
               "batch/kept_groups": float(min(n_kept, want))}
    return rounds, train, metrics


def compute_advantages(batch: RolloutBatch, cfg: Config) -> dict[str, float]:
    """Sets batch.advantages ([B] or [B, T]) from the shaped scores: the configured estimator, with KL in
    the reward (algorithm.kl_in_reward: needs old and reference logprobs) and batch whitening
    (algorithm.whiten_advantages). GAE (needs batch.values) also sets batch.returns. Returns metrics."""
    a, mask = cfg.algorithm, batch.response_mask
    metrics: dict[str, float] = {}
    token_rewards = None
    if a.kl_in_reward:
        token_rewards = kl_penalty_rewards(batch.scores, batch.old_logprobs, batch.ref_logprobs, mask, a.kl_coef,
                                           a.kl_estimator)
        kl = KL_ESTIMATORS.get(a.kl_estimator)(batch.old_logprobs, batch.ref_logprobs)
        metrics["reward/kl"] = float(masked_mean(kl, mask))
    if a.advantage == "gae":
        rewards = token_rewards if token_rewards is not None else scores_to_token_rewards(batch.scores, mask)
        advantages, batch.returns = gae_advantages(rewards, batch.values, mask, a.gamma, a.lam)
    else:
        options = {"response_mask": mask, "norm_by_std": a.norm_adv_by_std, "gamma": a.gamma}
        if token_rewards is not None:
            options["token_rewards"] = token_rewards
        advantages = ADVANTAGE_ESTIMATORS.get(a.advantage)(batch.scores, batch.group_ids, **options)
    if a.whiten_advantages:
        advantages = whiten_advantages(advantages, mask)
    batch.advantages = advantages
    token_adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1).expand_as(mask)
    metrics["advantage/mean"] = float(masked_mean(token_adv, mask))
    metrics["advantage/abs_mean"] = float(masked_mean(token_adv.abs(), mask))
    return metrics


def old_logprobs_from_rollout(cfg: Config) -> bool:
    """Whether the PPO ratio's old logprobs are the engine's (train.old_logprobs; auto: when the model runs in
    float32, so the engine computes the trainer's distribution, as rollout/logprob_abs_diff shows)."""
    if cfg.train.old_logprobs == "auto":
        return cfg.model.dtype == "float32"
    return cfg.train.old_logprobs == "rollout"


def logprob_gap(batch: RolloutBatch, trainer_logprobs: torch.Tensor) -> dict[str, float]:
    """The engine's logprobs against the trainer's on the same weights: mean and max absolute gap per token."""
    m = batch.response_mask
    diff = (batch.rollout_logprobs - trainer_logprobs).abs() * m
    return {"rollout/logprob_abs_diff": float(diff.sum() / m.sum().clamp(min=1)),
            "rollout/logprob_max_abs_diff": float(diff.max()) if m.any() else 0.0}


def batch_metrics(rounds: list[Round], train_batch: RolloutBatch, cfg: Config, step: int) -> dict[str, float]:
    """Metrics of step `step`'s generated samples (all rounds) and its training batch. The weights synced after
    step k are version k, so on-policy the samples of step k carry version k - 1: `rollout/policy_version` is
    the oldest version among them and `rollout/staleness` how many steps behind it is (0 on-policy)."""
    samples = [s for r in rounds for s in r.samples]
    oldest = int(torch.cat([r.batch.policy_version for r in rounds]).min())
    raw = torch.cat([r.raw_scores for r in rounds])
    lengths = torch.cat([r.lengths for r in rounds])
    out = {"batch/informative_frac": len(train_batch) / len(samples)}
    out |= {
        "reward/mean": float(raw.mean()),
        "reward/accuracy": float((raw >= 1).float().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "reward/timeouts": float(sum(r.timeouts for r in rounds)),
        "rollout/policy_version": float(oldest),
        "rollout/staleness": float(step - 1 - oldest),
    }
    if cfg.reward.overlong_buffer > 0 or cfg.reward.scale != 1.0 or cfg.reward.clip is not None:
        out["reward/shaped_mean"] = float(torch.cat([r.batch.scores for r in rounds]).mean())
    if cfg.reward.overlong_buffer > 0:
        out["reward/overlong_penalty_mean"] = float(torch.cat([r.overlong_penalty for r in rounds]).mean())
    if cfg.algorithm.overlong_filter and len(train_batch):
        out["batch/overlong_masked_frac"] = float((train_batch.response_mask.sum(1) == 0).float().mean())
    return out

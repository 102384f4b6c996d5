"""The pipelined iteration of a disaggregated or hybrid placement (M2Flow's macro-to-micro flow): the rollout
replicas put each prompt's group into a channel as soon as its n samples are done, and the driver turns every few
groups into a micro-batch that flows on through reward, group filter, logprobs (reference) and advantage into the
actor's streamed update, while the engines keep generating the rest. The update stays on-policy: the micro-batches'
gradients accumulate and the optimizer steps once per mini-batch (train.mini_batches of the step's groups, in
arrival order); the weights sync after the step.

The same stages as the collocated iteration (runner.py), in the same order per micro-batch; only the granularity
differs, so with train.mini_batches=1 both give the same update (float rounding aside): every advantage used here
is a function of one group (`streamable` says when that holds), and a mini-batch's loss is the sum of its
micro-batches' summed losses over its total weight (training/actor.accumulate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ray
import torch

from m2flow.batch import RolloutBatch
from m2flow.config import Config
from m2flow.faults import stage
from m2flow.scheduler.channel import Channel
from m2flow.scheduler.group import WorkerGroup, expected_work, split_by_work
from m2flow.stages import Round, compute_advantages, informative_rows, logprob_gap, prepare_round
from m2flow.timeline import Recorder

GROUP_LOCAL_ADVANTAGES = ("grpo", "dr_grpo", "rloo")  # a group's advantages depend on that group's scores alone


def streamable(cfg: Config, rollout_old: bool) -> str:
    """Why the pipelined iteration cannot stream this config's micro-batches into the update ("" when it can):
    then the step waits for the whole batch, as collocated, with the roles still on their own devices."""
    a, t = cfg.algorithm, cfg.train
    if a.advantage not in GROUP_LOCAL_ADVANTAGES:
        return f"algorithm.advantage={a.advantage} is not a function of one group ({', '.join(GROUP_LOCAL_ADVANTAGES)} are)"
    if a.whiten_advantages:
        return "algorithm.whiten_advantages normalises over the whole batch"
    if a.dynamic_sampling_max_tries > 1:
        return "algorithm.dynamic_sampling_max_tries > 1 resamples after the whole round"
    if t.epochs > 1:
        return "train.epochs > 1 passes over the whole batch again"
    if t.mini_batches > 1 and not rollout_old:
        return "train.mini_batches > 1 with trainer-computed old logprobs (train.old_logprobs) would compute them " \
               "after the step's first optimizer step"
    if cfg.rollout.backend != "m2flow":
        return "rollout.backend=hf has no streaming API"
    return ""


@dataclass
class StreamedStep:
    """What one pipelined iteration produced, as the collocated one does (runner.py)."""

    rounds: list[Round]  # one: the whole generated round, in arrival order
    train_batch: RolloutBatch  # the kept rows that were trained on
    filter_metrics: dict[str, float]
    train_metrics: dict[str, float]
    engine_stats: object  # the replicas' GenerateStats of this generation, summed
    rollout_spans: list  # the replicas' timeline spans, returned with their generate calls


@dataclass
class Generation:
    """A step's generation, started on the engine replicas (their generate_into calls), streaming into a channel."""

    prompt_ids: list[int]  # the step's prompts, as indices into the task's training problems
    calls: list  # the replicas' generate_into ObjectRefs (each: the number of groups it put)
    params: object  # the SamplingParams (n samples per prompt)


def start_generation(rollout: WorkerGroup, channel: Channel, prompt_ids: list[int], prompts: list[str],
                     prompt_tokens: list[int], params) -> Generation:
    """`prompts` split over the replicas by expected work, each replica streaming its groups into `channel`.
    Calls queue on each replica behind its earlier ones (a weight sync submitted before runs before)."""
    shares = split_by_work(expected_work(prompt_tokens, params), len(rollout))
    calls = [rollout.ranks[r].generate_into.remote(channel, prompts[s.start:s.stop], params, first_index=s.start)
             for r, s in enumerate(shares)]
    return Generation(prompt_ids, calls, params)


def streamed_step(cfg: Config, generation: Generation, actor: WorkerGroup, reference: WorkerGroup | None,
                  channel: Channel, score: Callable[[list], tuple[list[float], int]], pad_token_id: int,
                  rollout_old: bool, check_logprobs: bool, driver: Recorder,
                  on_generated: Callable[[], None] = lambda: None) -> StreamedStep:
    """One iteration over a started `generation`: its groups taken from `channel` as they finish, each
    micro-batch of groups scored (`score(samples) -> (scores, timeouts)`), filtered (algorithm.filter_groups),
    given old (the engine's when `rollout_old`, else the actor's) and reference logprobs and advantages, and added
    to the actor's update, which steps after each mini-batch's groups. `on_generated()` runs once every group
    is in (one-step off-policy starts the next step's generation there)."""
    P, n, generating = len(generation.prompt_ids), generation.params.n, generation.calls
    per_chunk = max(1, cfg.train.micro_batch_size // n)  # groups per micro-batch
    per_mini = -(-P // cfg.train.mini_batches)  # groups per optimizer step
    parts: list[Round] = []
    kept: list[RolloutBatch] = []
    train_metrics: dict[str, float] = {}
    learning: list = []  # the actor's learn calls (their errors surface when waited for)
    received = in_mini = rows_in_mini = 0
    stepped = False  # an optimizer step was taken this iteration
    gaps: list[tuple[float, dict]] = []  # (tokens, logprob_gap) of the micro-batches the trainer checked
    advantage_metrics: list[tuple[float, dict]] = []  # (tokens, compute_advantages' token means) per micro-batch
    while received < P:
        with stage({}, "rollout"):  # a replica that fails stops the wait at once, with its error
            groups = channel.get_batch(float("inf"), min(per_chunk, P - received, per_mini - in_mini), generating)
        received += len(groups)
        in_mini += len(groups)
        samples = [s for g in groups for s in g]
        with stage({}, "reward"), driver.span("reward", groups=len(groups)):
            scores, timeouts = score(samples)
            part = prepare_round(RolloutBatch.from_samples(samples, pad_token_id), samples, torch.tensor(scores), cfg,
                                 timeouts=timeouts)
        parts.append(part)
        rows = part.batch.select(informative_rows(part.batch)) if cfg.algorithm.filter_groups else part.batch
        step_after = in_mini == per_mini or received == P
        if len(rows):
            with stage({}, "logprobs"):
                rows_ref = ray.put(rows)
                ref_refs = reference.remote("compute_logprobs", rows_ref) if reference is not None else None
                # the trainer's pass: the old logprobs, or (before the step's first optimizer step) a check
                trainer = (ray.get(actor.remote("compute_logprobs", rows_ref)[0])
                           if not rollout_old or (check_logprobs and not stepped) else None)
                rows.old_logprobs = rows.rollout_logprobs * rows.response_mask if rollout_old else trainer
                rows.ref_logprobs = ray.get(ref_refs[0]) if ref_refs else None
            if trainer is not None:  # the engine vs the trainer on the same weights
                gaps.append((float(rows.response_mask.sum()), logprob_gap(rows, trainer)))
            with driver.span("advantage", rows=len(rows)):
                advantage_metrics.append((float(rows.response_mask.sum()), compute_advantages(rows, cfg)))
            learning += actor.remote("learn", ray.put(rows), step_after)
            kept.append(rows)
            rows_in_mini += len(rows)
        elif step_after and rows_in_mini:  # the mini-batch's last groups were all filtered out
            learning += actor.remote("learn", None, True)
        if step_after:
            stepped |= rows_in_mini > 0
            in_mini = rows_in_mini = 0
        if received == P:
            with stage({}, "rollout"):
                done = ray.get(generating)  # each replica's (groups, engine stats, timeline spans)
            on_generated()
    with stage({}, "update"):  # an update call's error (its traceback is in the StageError's cause)
        ray.get(learning)
    if kept:
        train_metrics |= actor.call("streamed_update_metrics")[0]
    if advantage_metrics:  # token means over all the kept tokens
        tokens = sum(t for t, _ in advantage_metrics) or 1.0
        train_metrics |= {k: sum(t * m[k] for t, m in advantage_metrics) / tokens for k in advantage_metrics[0][1]}
    if gaps:  # over every checked token
        tokens = sum(t for t, _ in gaps) or 1.0
        train_metrics["rollout/logprob_abs_diff"] = sum(t * g["rollout/logprob_abs_diff"] for t, g in gaps) / tokens
        train_metrics["rollout/logprob_max_abs_diff"] = max(g["rollout/logprob_max_abs_diff"] for _, g in gaps)
    whole = Round(RolloutBatch.concat([p.batch for p in parts], pad_token_id), [s for p in parts for s in p.samples],
                  torch.cat([p.raw_scores for p in parts]), torch.cat([p.lengths for p in parts]),
                  None if parts[0].overlong_penalty is None else torch.cat([p.overlong_penalty for p in parts]),
                  sum(p.timeouts for p in parts))
    train_batch = RolloutBatch.concat(kept, pad_token_id) if kept else whole.batch.select(torch.tensor([], dtype=torch.long))
    filter_metrics = {}
    if cfg.algorithm.filter_groups:
        n_kept = len(torch.unique(train_batch.group_ids)) if kept else 0
        filter_metrics = {"batch/sampling_rounds": 1.0, "batch/dropped_groups": float(P - n_kept),
                          "batch/kept_groups": float(n_kept)}
    stats = [d[1] for d in done]
    return StreamedStep([whole], train_batch, filter_metrics, train_metrics,
                        None if stats[0] is None else sum(stats[1:], stats[0]), [s for d in done for s in d[2]])

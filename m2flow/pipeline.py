"""The rollout of a pipelined placement (disaggregated, hybrid): the engine replicas put each prompt's group into
a channel as soon as its n samples are done, and `StreamedRollout` turns every few groups into a scored, filtered
micro-batch for the rest of the macro flow (m2flow/flow.py), while the engines keep generating the rest. The
micro-batches are cut at mini-batch boundaries (train.mini_batches of the step's groups, in arrival order), where
the actor's streamed update takes its optimizer step: the update stays on-policy.

With train.mini_batches=1 the update is the collocated one (float rounding aside): every advantage used here is a
function of one group (`streamable` says when that holds), and a mini-batch's loss is the sum of its
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
from m2flow.stages import Micro, Round, informative_rows, prepare_round
from m2flow.timeline import Recorder

GROUP_LOCAL_ADVANTAGES = ("grpo", "dr_grpo", "rloo")  # a group's advantages depend on that group's scores alone


def streamable(cfg: Config, rollout_old: bool, inference_apart: bool = False) -> str:
    """Why the pipelined iteration cannot stream this config's micro-batches into the update ("" when it can):
    then the step waits for the whole batch, as collocated, with the roles still on their own devices.
    `inference_apart`: old logprobs come from the inference group, whose weights stay those of the step's start."""
    a, t = cfg.algorithm, cfg.train
    if a.advantage not in GROUP_LOCAL_ADVANTAGES:
        return f"algorithm.advantage={a.advantage} is not a function of one group ({', '.join(GROUP_LOCAL_ADVANTAGES)} are)"
    if a.whiten_advantages:
        return "algorithm.whiten_advantages normalises over the whole batch"
    if a.dynamic_sampling_max_tries > 1:
        return "algorithm.dynamic_sampling_max_tries > 1 resamples after the whole round"
    if t.epochs > 1:
        return "train.epochs > 1 passes over the whole batch again"
    if t.mini_batches > 1 and not rollout_old and not inference_apart:
        return "train.mini_batches > 1 with old logprobs from the actor (train.old_logprobs) would compute them " \
               "after the step's first optimizer step (give `inference` devices of its own to compute them there)"
    if cfg.rollout.backend != "m2flow":
        return "rollout.backend=hf has no streaming API"
    return ""


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


class StreamedRollout:
    """A step's rollout as micro-batches: iterating takes the started `generation`'s groups from `channel` as they
    finish, `train.micro_batch_size / n` at a time (never across a mini-batch boundary), scores them
    (`score(samples) -> (scores, timeouts)`), shapes and filters them (algorithm.filter_groups), and yields each as
    a `Micro`: its kept rows (None when all were filtered out but the mini-batch ends there), whether the optimizer
    steps after it, and whether the trainer checks the engine's logprobs on it (`check`, only before the step's
    first optimizer step: later the trainer's weights have moved). `on_generated()` runs once every group is in
    (one-step off-policy starts the next step's generation there). After the last micro-batch, `rounds` holds the
    whole round (in arrival order), `filter_metrics` what the filter dropped, `engine_stats` the replicas' summed
    GenerateStats and `spans` their timeline spans (which came back with their generate calls)."""

    def __init__(self, cfg: Config, generation: Generation, channel: Channel,
                 score: Callable[[list], tuple[list[float], int]], pad_token_id: int, check: bool, driver: Recorder,
                 times: dict[str, float], on_generated: Callable[[], None] = lambda: None):
        self.cfg, self.generation, self.channel, self.score = cfg, generation, channel, score
        self.pad_token_id, self.check, self.driver, self.times, self.on_generated = (pad_token_id, check, driver,
                                                                                      times, on_generated)
        self.rounds: list[Round] = []
        self.filter_metrics: dict[str, float] = {}
        self.engine_stats = None
        self.spans: list = []

    def __iter__(self):
        cfg, P, n = self.cfg, len(self.generation.prompt_ids), self.generation.params.n
        per_chunk = max(1, cfg.train.micro_batch_size // n)  # groups per micro-batch
        per_mini = -(-P // cfg.train.mini_batches)  # groups per optimizer step
        parts: list[Round] = []
        received = in_mini = rows_in_mini = kept_groups = 0
        stepped = False  # an optimizer step was taken this iteration
        while received < P:
            with stage(self.times, "rollout"):  # waiting for groups; a replica that fails stops the wait at once
                groups = self.channel.get_batch(float("inf"), min(per_chunk, P - received, per_mini - in_mini),
                                                self.generation.calls)
            received += len(groups)
            in_mini += len(groups)
            samples = [s for g in groups for s in g]
            with stage(self.times, "reward"), self.driver.span("reward", groups=len(groups)):
                scores, timeouts = self.score(samples)
                part = prepare_round(RolloutBatch.from_samples(samples, self.pad_token_id), samples,
                                     torch.tensor(scores), cfg, timeouts=timeouts)
            parts.append(part)
            rows = part.batch.select(informative_rows(part.batch)) if cfg.algorithm.filter_groups else part.batch
            kept_groups += len(torch.unique(rows.group_ids)) if len(rows) else 0
            rows_in_mini += len(rows)
            step_after = in_mini == per_mini or received == P
            if received == P:
                with stage(self.times, "rollout"):
                    done = ray.get(self.generation.calls)  # each replica's (groups, engine stats, timeline spans)
                self.on_generated()
            if len(rows) or (step_after and rows_in_mini):  # (a step on what the mini-batch's earlier rows added)
                yield Micro(rows if len(rows) else None, step_after, self.check and not stepped)
            if step_after:
                stepped |= rows_in_mini > 0
                in_mini = rows_in_mini = 0
        self.rounds = [Round(RolloutBatch.concat([p.batch for p in parts], self.pad_token_id),
                             [s for p in parts for s in p.samples], torch.cat([p.raw_scores for p in parts]),
                             torch.cat([p.lengths for p in parts]),
                             None if parts[0].overlong_penalty is None else torch.cat([p.overlong_penalty for p in parts]),
                             sum(p.timeouts for p in parts))]
        if cfg.algorithm.filter_groups:
            self.filter_metrics = {"batch/sampling_rounds": 1.0, "batch/dropped_groups": float(P - kept_groups),
                                   "batch/kept_groups": float(kept_groups)}
        stats = [d[1] for d in done]
        self.engine_stats = None if stats[0] is None else sum(stats[1:], stats[0])
        self.spans = [s for d in done for s in d[2]]

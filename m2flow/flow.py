"""The macro flow: one RL iteration, written once for every placement (`Flow.iteration`).

    rollout -> reward -> filter -> logprobs (old, reference, values) -> advantage -> update -> weight sync

The placement only decides the granularity at which micro-batches flow from the rollout into the rest: in a
collocated placement the rollout is the whole step's batch, generated, scored and filtered stage by stage
(`WholeBatchRollout`); in a pipelined one (disaggregated, hybrid) it is a stream of micro-batches of groups, taken
from a channel as the engines finish them (m2flow/pipeline.py `StreamedRollout`), whose gradients the actor
accumulates while the engines generate the rest. Everything after the rollout is the same code for both.

(Reward and the group filter come before the logprob pass because they are cheap and tell which groups carry a
gradient: with `algorithm.filter_groups`, groups whose samples all got the same reward are dropped before the
trainer spends compute on them; with `algorithm.dynamic_sampling_max_tries > 1`, more prompts are sampled until
`train.prompts_per_step` informative groups are found. Advantages come after the logprob pass because KL in the
reward and GAE need the reference logprobs and the critic's values.)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import ray
import torch

from m2flow.batch import RolloutBatch
from m2flow.config import Config
from m2flow.data.task import PromptSampler, Task
from m2flow.faults import stage, timer
from m2flow.pipeline import Generation, StreamedRollout, start_generation
from m2flow.rewards.limits import RewardScorer
from m2flow.rollout import SamplingParams
from m2flow.scheduler.channel import Channel
from m2flow.scheduler.group import WorkerGroup, generate_on_replicas
from m2flow.stages import (
    Micro,
    Round,
    collect_batch,
    compute_advantages,
    logprob_gap,
    old_logprobs_from_rollout,
    prepare_round,
    round_seed,
)
from m2flow.timeline import Recorder
from m2flow.training.weight_sync import GB

MAX_METRICS = ("rollout/logprob_max_abs_diff",)  # a maximum over micro-batches; the others are token means


@dataclass
class Iteration:
    """What one iteration did: its generated rounds, the rows it trained on, and its metrics."""

    rounds: list[Round]  # every generated sample (several rounds with dynamic sampling)
    train_batch: RolloutBatch  # the kept rows, with advantages
    metrics: dict[str, float]  # filter, logprob check, advantage, update, weight sync and engine metrics, times
    spans: list = field(default_factory=list)  # the engines' timeline spans that came with their calls


@dataclass
class TokenMeans:
    """Micro-batches' token-mean metrics combined into the whole batch's: weighted by each one's tokens."""

    sums: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)

    def add(self, rows: RolloutBatch, metrics: dict[str, float]) -> None:
        weight = float(rows.response_mask.sum())
        for k, v in metrics.items():
            if k in MAX_METRICS:
                self.sums[k] = max(self.sums.get(k, v), v)
                self.tokens[k] = 1.0
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * weight
                self.tokens[k] = self.tokens.get(k, 0.0) + weight

    def values(self) -> dict[str, float]:
        return {k: v / (self.tokens[k] or 1.0) for k, v in self.sums.items()}


class Flow:
    """The worker groups and the run's pieces the iteration needs; `iteration(step)` runs one step."""

    def __init__(self, cfg: Config, rollout: WorkerGroup, actor: WorkerGroup, reference: WorkerGroup | None,
                 critic: WorkerGroup | None, task: Task, tokenizer, prompt, scorer: RewardScorer,
                 channel: Channel | None, driver: Recorder, inference: WorkerGroup | None = None):
        """`prompt(problem) -> str`: a problem as the model sees it; `channel`: a pipelined placement's (None:
        the whole batch, stage by stage); `driver`: the timeline of the driver's own stages (reward, advantage);
        `inference`: the policy's logprob group on devices apart from the actor's (None: the actor computes them)."""
        self.cfg, self.rollout, self.actor, self.reference, self.critic = cfg, rollout, actor, reference, critic
        self.inference = inference
        self.task, self.tokenizer, self.prompt, self.scorer = task, tokenizer, prompt, scorer
        self.channel, self.driver = channel, driver
        self.sampler = PromptSampler(len(task.train), cfg.seed)
        r = cfg.rollout
        self.sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                       max_new_tokens=r.max_new_tokens)
        self.rollout_old = old_logprobs_from_rollout(cfg)  # the PPO ratio's old logprobs are the engine's
        self.off_policy = cfg.algorithm.max_staleness > 0
        self.ahead: Generation | None = None  # one-step off-policy: the next step's generation, started early
        self.sampler_before_ahead: dict | None = None  # the sampler before `ahead` drew its prompts
        self.learning: list = []  # the streamed update's calls this step (their errors surface when waited for)
        self.loading: list = []  # the replicas' weight loads not waited for yet (one-step off-policy)

    def iteration(self, step: int) -> Iteration:
        """One RL iteration, the same for every placement (see the module doc)."""
        times: dict[str, float] = {}
        means, metrics, kept = TokenMeans(), {}, []
        with timer(times, "step"):
            rollout = WholeBatchRollout(self, step, times) if self.channel is None else self.streamed(step, times)
            for micro in rollout:  # the whole batch, or micro-batches of groups as the engines finish them
                self.logprobs(micro, means, times)  # old (the engine's or the trainer's), reference, values
                self.advantage(micro, means, times)
                metrics |= self.learn(micro, times)  # the update, or these rows' gradients added to it
                kept += [micro.rows] if micro.rows is not None else []
            if kept:
                metrics |= self.finish_update(times)
                with stage(times, "weight_sync"):
                    metrics |= self.sync_weights(step)
            else:  # no update, the same weights: the engines only take the new version number
                self.set_policy_version(step)
        if rollout.engine_stats is not None:  # m2flow's engine: prefix sharing, preemptions, decode batch size
            metrics |= rollout.engine_stats.metrics()
        train_batch = (RolloutBatch.concat(kept, self.tokenizer.pad_token_id) if kept
                       else rollout.rounds[0].batch.select(torch.tensor([], dtype=torch.long)))
        return Iteration(rollout.rounds, train_batch, {**rollout.filter_metrics, **means.values(), **metrics, **times},
                         rollout.spans)

    # -- the rollout, at the placement's granularity ------------------------------------------------------------

    def streamed(self, step: int, times: dict[str, float]) -> StreamedRollout:
        generation, self.ahead = self.ahead or self.generation(step), None

        def generate_ahead() -> None:
            """One-step off-policy: step + 1 starts sampling (with these weights) once this step's groups are all
            in, while this step trains; a checkpoint keeps the sampler as it was before."""
            if self.off_policy and step < self.cfg.train.steps:
                self.sampler_before_ahead = self.sampler.state()
                self.ahead = self.generation(step + 1)

        ids = generation.prompt_ids
        score = lambda samples: self.scorer([s.text for s in samples],  # noqa: E731
                                            [self.task.train[ids[s.prompt_index]].answer for s in samples])
        # (off-policy, the engines' weights are a step behind the trainer's: there is nothing to check)
        return StreamedRollout(self.cfg, generation, self.channel, score, self.tokenizer.pad_token_id,
                               self.check_logprobs(step) and not self.off_policy, self.driver, times, generate_ahead)

    def generation(self, step: int) -> Generation:
        """Step `step`'s prompts drawn and their generation started on the replicas, streaming into the channel."""
        ids = self.sampler.next(self.cfg.train.prompts_per_step)
        prompts = [self.prompt(self.task.train[i]) for i in ids]
        return start_generation(self.rollout, self.channel, ids, prompts,
                                [len(x) for x in self.tokenizer(prompts).input_ids],
                                dataclasses.replace(self.sampling, seed=round_seed(self.cfg.seed, step, 0)))

    def generate(self, prompts: list[str], params: SamplingParams):
        """Samples from the engine replicas, the prompts split by expected work (tokens) when there are several."""
        tokens = [len(ids) for ids in self.tokenizer(prompts).input_ids] if len(self.rollout) > 1 else None
        return generate_on_replicas(self.rollout, prompts, params, tokens)

    def check_logprobs(self, step: int) -> bool:
        """Whether this step also runs the trainer's logprob pass to compare with the engine's."""
        every = self.cfg.train.logprob_check_every
        return every > 0 and step % every == 0

    # -- the stages after the rollout: the same for every placement ----------------------------------------------

    def logprobs(self, micro: Micro, means: TokenMeans, times: dict[str, float]) -> None:
        """Sets the rows' old logprobs (the engine's, unless train.old_logprobs makes a trainer pass compute them, as
        it also does for a check: the inference group's where there is one, else the actor's), reference logprobs
        (with a KL term) and values (with a critic); the groups compute at once, every rank of each returns the
        whole batch's, rank 0's are taken."""
        rows = micro.rows
        if rows is None:
            return
        with stage(times, "logprobs"):
            trainer_pass = not self.rollout_old or micro.check
            # one copy in the object store for every worker that reads the rows
            ref = ray.put(rows) if trainer_pass or self.reference is not None or self.critic is not None else None
            old_refs = (self.inference or self.actor).remote("compute_logprobs", ref) if trainer_pass else None
            ref_refs = self.reference.remote("compute_logprobs", ref) if self.reference is not None else None
            values_refs = self.critic.remote("compute_values", ref) if self.critic is not None else None
            trainer = ray.get(old_refs[0]) if trainer_pass else None
            rows.old_logprobs = rows.rollout_logprobs * rows.response_mask if self.rollout_old else trainer
            rows.ref_logprobs = ray.get(ref_refs[0]) if ref_refs else None
            rows.values = ray.get(values_refs[0]) if values_refs else None
        if trainer is not None:  # the engine vs the trainer on the same weights
            means.add(rows, logprob_gap(rows, trainer))

    def advantage(self, micro: Micro, means: TokenMeans, times: dict[str, float]) -> None:
        """Sets the rows' advantages (and returns, with GAE): the configured estimator (stages.compute_advantages)."""
        if micro.rows is not None:
            with stage(times, "advantage"), self.driver.span("advantage", rows=len(micro.rows)):
                means.add(micro.rows, compute_advantages(micro.rows, self.cfg))

    def learn(self, micro: Micro, times: dict[str, float]) -> dict[str, float]:
        """Collocated: the critic's and the actor's updates over the whole batch (their metrics). Pipelined: the
        rows' gradients added to the actor's streamed update, and its optimizer step at a mini-batch's end (not
        waited for: `finish_update` collects them)."""
        if self.channel is not None:
            rows = ray.put(micro.rows) if micro.rows is not None else None
            self.learning += self.actor.remote("learn", rows, micro.step_after)
            return {}
        metrics = {}
        update_ref = ray.put(micro.rows)  # with the advantages (and returns): one copy for both groups
        if self.critic is not None:
            with stage(times, "critic_update"):
                metrics |= self.critic.call("update", update_ref)[0]  # the same on every rank
        with stage(times, "update"):
            metrics |= self.actor.call("update", update_ref)[0]  # the same on every rank
        return metrics

    def finish_update(self, times: dict[str, float]) -> dict[str, float]:
        """Pipelined: waits for the streamed update (an error in it surfaces here) and returns its metrics, as a
        collocated update returns them; collocated: nothing left."""
        if self.channel is None:
            return {}
        with stage(times, "update"):
            learning, self.learning = self.learning, []
            ray.get(learning)
            return self.actor.call("streamed_update_metrics")[0]

    def sync_weights(self, version: int) -> dict[str, float]:
        """The trainer's weights into every engine replica (and the inference group's ranks), as weight version
        `version`, in buckets of at most train.weight_sync_bucket_mb: the trainer ranks gather them weight by weight
        and rank 0 puts each bucket into the object store; each replica fetches and loads the buckets one at a time.
        The driver handles only the references. Returns the weight_sync/ metrics (GiB moved to each replica, and per second). One-step
        off-policy, the loads queue behind the next step's generation and are not waited for."""
        began = time.perf_counter()
        self.wait_for_loads()  # the last step's sync, when it was not waited for
        refs, total = self.actor.call("weight_buckets", self.cfg.train.weight_sync_bucket_mb)[0]  # rank 0's
        loads = self.rollout.remote("load_weight_buckets", refs, version)  # in a list: references stay references
        followers = self.inference.remote("load_weight_buckets", refs, version) if self.inference else []
        metrics = {"weight_sync/gb": total / GB, "weight_sync/buckets": float(len(refs))}
        if self.off_policy:
            self.loading += loads + followers
            return metrics
        ray.get(loads + followers)
        return metrics | {"weight_sync/gb_per_s": total / GB / max(time.perf_counter() - began, 1e-9)}

    def set_policy_version(self, version: int) -> None:
        """The weights are unchanged but count as version `version` (a step without an update)."""
        self.loading += self.rollout.remote("set_policy_version", version)
        if not self.off_policy:
            self.wait_for_loads()

    def wait_for_loads(self) -> None:
        loading, self.loading = self.loading, []
        ray.get(loading)

    def sampler_state(self) -> dict:
        """The prompt sampler as a checkpoint keeps it: before the draw of a generation started ahead."""
        return self.sampler_before_ahead if self.ahead is not None else self.sampler.state()


class WholeBatchRollout:
    """A collocated step's rollout: generation rounds over the whole batch (more than one with dynamic sampling),
    each scored and shaped, the informative groups kept (stages.collect_batch), as one Micro."""

    def __init__(self, flow: Flow, step: int, times: dict[str, float]):
        cfg, stats = flow.cfg, []

        def generate_round(r: int) -> Round:
            """Round r of this step: fresh prompts, sampled, scored and shaped; group ids offset by r * P."""
            ids = flow.sampler.next(cfg.train.prompts_per_step)
            params = dataclasses.replace(flow.sampling, seed=round_seed(cfg.seed, step, r))
            with stage(times, "rollout"):
                samples = flow.generate([flow.prompt(flow.task.train[i]) for i in ids], params)
                replicas = flow.rollout.call("stats")
                stats.append(None if replicas[0] is None else sum(replicas[1:], replicas[0]))
                batch = RolloutBatch.from_samples(samples, flow.tokenizer.pad_token_id)
            with stage(times, "reward"), flow.driver.span("reward", rows=len(samples)):
                truths = [flow.task.train[ids[s.prompt_index]].answer for s in samples]
                scores, timeouts = flow.scorer([s.text for s in samples], truths)
                return prepare_round(batch, samples, torch.tensor(scores), cfg,
                                     group_offset=r * cfg.train.prompts_per_step, timeouts=timeouts)

        self.rounds, self.batch, self.filter_metrics = collect_batch(generate_round, cfg, flow.tokenizer.pad_token_id)
        self.engine_stats = None if stats[0] is None else sum(stats[1:], stats[0])
        self.check = flow.check_logprobs(step)
        self.spans: list = []  # (the engines' spans are drained with the other workers')

    def __iter__(self):
        if len(self.batch):
            yield Micro(self.batch, step_after=True, check=self.check)

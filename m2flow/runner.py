"""The macro flow. One RL iteration reads top to bottom:

    rollout -> reward -> filter -> logprobs (actor old / reference / critic values) -> advantage
            -> update (critic, actor) -> weight sync

(Reward and the group filter come before the logprob pass because they are cheap and tell which groups carry
a gradient: with `algorithm.filter_groups`, groups whose samples all got the same reward are dropped before the
trainer spends compute on them; with `algorithm.dynamic_sampling_max_tries > 1`, more prompts are sampled until
`train.prompts_per_step` informative groups are found. Advantages come after the logprob pass because KL in the
reward and GAE need the reference logprobs and the critic's values.)

Everything else here is set-up (base model, workers) and bookkeeping (metrics, checkpoints, summary). The data
is in data/task.py, the stages' pure functions in stages.py, failure handling in faults.py and resumable
checkpoints in resume.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time

import numpy as np
import ray
import torch
from tqdm import tqdm

from m2flow.batch import RolloutBatch
from m2flow.config import CRITIC_ESTIMATORS, BaseModelConfig, Config, save_config, validate
from m2flow.data.task import PromptSampler, Task, drop_long_prompts, engine_max_len, load_task
from m2flow.data.templates import format_prompt
from m2flow.eval import EvalResult, evaluate
from m2flow.eval.in_training import GenerateOnly, benchmark_metrics
from m2flow.eval.run import Protocol
from m2flow.faults import NonFiniteTrainingError, StageError, check_bad_steps, stage, timer, write_status
from m2flow.io import atomic_write_text
from m2flow.metrics import MetricsLogger, plot_metrics
from m2flow.models.hub import resolve_model_path
from m2flow.rewards import get_reward
from m2flow.rewards.limits import RewardPool, RewardScorer
from m2flow.rewards.math import timeout_score
from m2flow.resume import (
    CRITIC,
    clean_checkpoints,
    find_run_to_resume,
    load_run_state,
    periodic_checkpoints,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from m2flow.rollout import SamplingParams
from m2flow.scheduler.cluster import start_ray, stop_ray
from m2flow.scheduler.devices import Device, check_devices, place, release_devices, run_devices
from m2flow.pipeline import Generation, start_generation, streamable, streamed_step
from m2flow.scheduler.channel import Channel
from m2flow.scheduler.group import WorkerGroup, generate_on_replicas, rank_group
from m2flow.scheduler.placement import resolve_placement
from m2flow.timeline import Recorder, append_spans, drop_spans_after
from m2flow.scheduler.workers import ActorWorker, CriticWorker, ReferenceWorker, RolloutWorker, Start
from m2flow.stages import (
    Round,
    batch_metrics,
    collect_batch,
    compute_advantages,
    logprob_gap,
    old_logprobs_from_rollout,
    prepare_round,
    round_seed,
)
from m2flow.training.warm_start import ensure_base_model
from m2flow.training.weight_sync import GB

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def base_config(cfg: Config) -> BaseModelConfig:
    """cfg.base with its seed resolved (null = the run's seed)."""
    return cfg.base if cfg.base.seed is not None else dataclasses.replace(cfg.base, seed=cfg.seed)


def make_run_dir(cfg: Config) -> str:
    path = os.path.join(cfg.output_dir, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(path, exist_ok=False)
    return path


def run(cfg: Config, progress: bool = True) -> dict:
    """Runs the experiment described by `cfg`; returns the summary (also written to summary.json)."""
    validate(cfg)  # a Config built in Python gets the same checks as one loaded from YAML
    seed_everything(cfg.seed)
    t_start = time.time()
    # bad config, data and prompts stop here, before a run directory is made or Ray is started
    run_dir = find_run_to_resume(cfg.resume, cfg.output_dir, cfg.name)  # None: a new run
    check_devices(cfg.cluster)
    task = load_task(cfg)
    if cfg.model.path:
        model_path, base_info = resolve_model_path(cfg.model.path), {}  # a Hub id -> its local snapshot
    else:
        model_path, base_info = ensure_base_model(base_config(cfg), task.sft, task.held_out[: cfg.eval.num_problems],
                                                  cfg.data.template, cfg.eval.max_new_tokens, progress)
    task = drop_long_prompts(task, model_path, cfg)
    checkpoint = None
    if run_dir is None:
        run_dir = make_run_dir(cfg)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    else:  # a run that was killed or failed: continue it from its last complete checkpoint
        removed = clean_checkpoints(run_dir, cfg.checkpoint.keep_last)
        checkpoint = periodic_checkpoints(run_dir)[-1]
        _warn_config_changes(cfg, os.path.join(run_dir, "config.yaml"))
    _log_to_file(os.path.join(run_dir, "log.txt"))
    log.info("run directory: %s", run_dir)
    write_status(run_dir, "running")
    if checkpoint:
        log.info("resuming from %s%s", checkpoint, f" (removed leftovers {removed})" if removed else "")

    # Workers: rollout engine, trainer, (only with a KL term) the frozen reference and (only with GAE) the
    # critic, collocated; the trainer, reference and critic are groups of train.ranks ranks each.
    started_ray = not ray.is_initialized()
    start_ray(cfg.cluster)
    pool = RewardPool(cfg.reward.workers)  # reward scoring with a hard per-response time limit
    workers: list = []  # every Ray actor the run starts, killed when it ends however it ends
    devices = []
    try:
        devices = run_devices(cfg.cluster)  # over the cluster's nodes (GPUs: reserved as a placement group)
        summary = _train(cfg, run_dir, model_path, base_info, task, devices, progress, t_start, pool, checkpoint,
                         workers)
        write_status(run_dir, "completed")
        return summary
    except BaseException as e:  # the run directory says that (and where) it failed
        write_status(run_dir, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", e)
        if isinstance(e, (StageError, NonFiniteTrainingError)):
            e.run_dir = run_dir  # the CLI points at status.json
        log.error("run failed: %s (recorded in %s)", e, os.path.join(run_dir, "status.json"))
        raise
    finally:  # a crashed worker surfaces as its exception here; the last checkpoint was written atomically
        pool.close()
        for handle in workers:  # also when Ray outlives the run (started by the caller)
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 (already dead)
                pass
        release_devices(devices)
        if started_ray:
            stop_ray()


def _train(cfg: Config, run_dir: str, model_path: str, base_info: dict, task: Task, devices: list[Device],
           progress: bool, t_start: float, pool: RewardPool | None = None, checkpoint: str | None = None,
           workers: list | None = None) -> dict:
    """The RL loop (from step 1, or from the step after `checkpoint`, a periodic checkpoint of this run), its
    worker groups collocated over `devices`."""
    plan = resolve_placement(cfg.cluster.placement, len(devices))
    log.info("placement: %s", plan.describe())
    on = lambda role: [devices[i] for i in plan.devices[role]]  # noqa: E731 (a role's devices)
    replicas = cfg.rollout.replicas  # engine replicas, data-parallel
    start = Start.of(model_path, cfg)  # what every worker starts from
    rollout = WorkerGroup(RolloutWorker, replicas, start, cfg.rollout, name=f"rollout-{os.getpid()}",
                          placements=place(replicas, on("rollout")), rank_kwargs=lambda r: {"rank": r})
    ranks = cfg.train.ranks  # each trainer group: FSDP2 over a gloo group of this many ranks, data parallel

    def trainer_group(cls, role: str, rendezvous: str, *args) -> WorkerGroup:
        """`ranks` ranks of `cls(start, *args)` over the devices of placement role `role`, forming a process group
        of their own through the file store run_dir/`rendezvous` (no port)."""
        return rank_group(cls, ranks, start, *args, name=f"{role}-{os.getpid()}", placements=place(ranks, on(role)),
                          store=os.path.join(run_dir, rendezvous))

    temperature = cfg.rollout.temperature  # the trainers' logprobs are those of the distribution sampled
    actor = trainer_group(ActorWorker, "actor", ".trainer-rendezvous", cfg.train, cfg.algorithm, temperature)
    reference = (trainer_group(ReferenceWorker, "inference", ".reference-rendezvous", cfg.train, temperature)
                 if cfg.algorithm.kl_coef > 0 else None)
    critic = (trainer_group(CriticWorker, "critic", ".critic-rendezvous", cfg.train, cfg.critic, cfg.algorithm)
              if cfg.algorithm.advantage in CRITIC_ESTIMATORS else None)
    groups = [g for g in (rollout, actor, reference, critic) if g is not None]
    if workers is not None:
        workers.extend(r for g in groups for r in g.ranks)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    scorer = RewardScorer(get_reward(cfg.reward.name), cfg.reward.timeout_s, timeout_score(cfg.reward.format_penalty),
                          {"format_penalty": cfg.reward.format_penalty}, pool)
    prompt = lambda p: format_prompt(p.question, tokenizer, cfg.data.template)  # noqa: E731
    held_out = task.held_out[: cfg.eval.num_problems]
    held_out_prompts = [prompt(p) for p in held_out]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    sampling = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)

    def generate(prompts: list[str], params: SamplingParams):
        """Samples from the engine replicas, the prompts split by expected work (tokens) when there are several."""
        tokens = [len(ids) for ids in tokenizer(prompts).input_ids] if len(rollout) > 1 else None
        return generate_on_replicas(rollout, prompts, params, tokens)

    protocol = Protocol(k=cfg.eval.k, temperature=cfg.eval.temperature,
                        top_p=cfg.eval.top_p if cfg.eval.temperature > 0 else 1.0,
                        max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed, template=cfg.data.template,
                        batch_size=cfg.rollout.engine.max_num_seqs)

    def held_out_eval() -> EvalResult:
        with stage({}, "eval"):
            return evaluate(generate, held_out, held_out_prompts, greedy, score_batch=lambda rs, ts: scorer(rs, ts)[0],
                            response_metrics=task.response_metrics)

    benchmark_engine = GenerateOnly(generate, tokenizer, engine_max_len(model_path))

    def benchmark_eval(step: int) -> dict[str, dict[str, float]]:
        """eval.benchmarks with k samples per problem ({} without any); samples in <run_dir>/eval/step_N/."""
        if not task.benchmarks:
            return {}
        with stage({}, "eval"):
            return benchmark_metrics(benchmark_engine, task.benchmarks, protocol,
                                     os.path.join(run_dir, "eval", f"step_{step:06d}"))

    def eval_metrics(result: EvalResult, benchmarks: dict[str, dict[str, float]]) -> dict[str, float]:
        return {"eval/accuracy": result.accuracy, "eval/response_tokens": result.mean_response_tokens,
                **{f"eval/{k}": v for k, v in result.extra.items()},
                **{f"eval/{b}/{m}": v for b, found in benchmarks.items() for m, v in found.items()}}

    skipped = {split: len(rows) for split, rows in task.skipped.items()}

    def sync_weights(version: int) -> dict[str, float]:
        """The trainer's weights into every engine replica, as weight version `version`, in buckets of at most
        train.weight_sync_bucket_mb: the trainer ranks gather them weight by weight and rank 0 puts each bucket
        into the object store; each replica fetches and loads the buckets one at a time. The driver handles only
        the references. Returns the weight_sync/ metrics (GiB moved to each replica, and per second)."""
        began = time.perf_counter()
        ray.get(loading)  # the last step's sync, when it was not waited for
        loading.clear()
        refs, total = actor.call("weight_buckets", cfg.train.weight_sync_bucket_mb)[0]  # rank 0's
        loads = rollout.remote("load_weight_buckets", refs, version)  # in a list: the references are passed as such
        metrics = {"weight_sync/gb": total / GB, "weight_sync/buckets": float(len(refs))}
        if off_policy:  # the replicas load after the generation they run now (the next step's): not waited for
            loading.extend(loads)
            return metrics
        ray.get(loads)
        return metrics | {"weight_sync/gb_per_s": total / GB / max(time.perf_counter() - began, 1e-9)}

    off_policy = cfg.algorithm.max_staleness > 0
    loading: list = []  # the replicas' weight loads not waited for yet (one-step off-policy)

    sampler = PromptSampler(len(task.train), cfg.seed)
    rollout_old = old_logprobs_from_rollout(cfg)
    log.info("old logprobs: %s", "the rollout engine's (train.old_logprobs=recompute for a trainer pass)"
             if rollout_old else "a trainer pass")
    channel = None  # a pipelined placement's: rollout groups, from the replicas to the driver, as they finish
    if plan.mode != "collocated":
        why_not = streamable(cfg, rollout_old)
        if why_not:
            log.warning("placement %s: the update waits for the whole batch, as collocated: %s", plan.mode, why_not)
        else:
            channel = Channel(f"rollout-{os.getpid()}", capacity=cfg.train.prompts_per_step)
            workers.append(channel.queue) if workers is not None else None
    driver = Recorder("driver")  # the driver's own stages (reward, advantage) on the timeline
    ahead, sampler_before_ahead = None, None  # one-step off-policy: the next step's generation, started early

    def generation_of(step: int) -> Generation:
        """Step `step`'s prompts drawn and their generation started on the replicas, streaming into the channel."""
        ids = sampler.next(cfg.train.prompts_per_step)
        prompts = [prompt(task.train[i]) for i in ids]
        return start_generation(rollout, channel, ids, prompts, [len(x) for x in tokenizer(prompts).input_ids],
                                dataclasses.replace(sampling, seed=round_seed(cfg.seed, step, 0)))

    timeline_path = os.path.join(run_dir, "timeline.jsonl")
    if checkpoint is None:
        metrics_log = MetricsLogger(run_dir)
        before, benchmarks_before = held_out_eval(), benchmark_eval(0)
        metrics_log.log(0, {**eval_metrics(before, benchmarks_before),
                            **{f"data/{k}_skipped": float(v) for k, v in skipped.items()}})
        log.info("held-out accuracy before RL: %.3f", before.accuracy)
        totals = {"samples": 0, "tokens": 0, "seconds": 0.0}
        first_step = 1
    else:  # everything the straight run would hold at this point: weights, optimizers, sampler, RNGs, totals
        state = load_run_state(checkpoint)
        with stage({}, "resume"):
            ray.get([*actor.remote("load_state", checkpoint)] +
                    (critic.remote("load_state", os.path.join(checkpoint, CRITIC)) if critic is not None else []))
            sync_weights(state["policy_version"])
        sampler.load_state(state["sampler"])
        set_rng_state(state["rng"])
        before, totals, first_step = EvalResult(**state["before"]), state["totals"], state["step"] + 1
        benchmarks_before = state.get("benchmarks_before", {})
        metrics_log = MetricsLogger(run_dir, resume_after=state["step"])  # drops rows logged after the checkpoint
        drop_spans_after(timeline_path, state["step"])
        log.info("resumed at step %d of %d", first_step, cfg.train.steps)
        if off_policy:
            log.warning("algorithm.max_staleness=1: the resumed run samples step %d with the checkpoint's weights, "
                        "where the straight run used the step before's; it continues close to, not exactly as, "
                        "the straight run", first_step)

    def save_checkpoint(step: int) -> None:
        def write_parts(tmp: str) -> None:
            ray.get([*actor.remote("save_state", tmp)] +
                    (critic.remote("save_state", os.path.join(tmp, CRITIC)) if critic is not None else []))
        write_checkpoint(run_dir, step, write_parts, {
            "policy_version": step, "sampler": sampler_before_ahead if ahead is not None else sampler.state(),
            "rng": rng_state(), "totals": totals,
            "before": dataclasses.asdict(before), "benchmarks_before": benchmarks_before, "base_model": model_path},
            cfg.checkpoint.keep_last)

    def check_logprobs(step: int) -> bool:
        """Whether this step also runs the trainer's logprob pass to compare with the engine's."""
        return cfg.train.logprob_check_every > 0 and step % cfg.train.logprob_check_every == 0

    def learn(train_batch: RolloutBatch, step: int, times: dict[str, float]) -> dict[str, float]:
        """The collocated iteration's stages after the filter, each over the whole batch: logprobs (the actor's
        old ones unless the engine's are, the reference's, the critic's values), advantages, the critic's and the
        actor's updates. Returns their metrics."""
        metrics = {}
        with stage(times, "logprobs"):
            # the trainer's pass is skipped when the engine's logprobs are the old ones (but for a check)
            check = not rollout_old or check_logprobs(step)
            # one copy in the object store for every worker that reads the batch
            batch_ref = ray.put(train_batch) if check or reference is not None or critic is not None else None
            # the three groups run at once; every rank of each returns the whole batch's: rank 0's are taken
            old_refs = actor.remote("compute_logprobs", batch_ref) if check else None
            ref_refs = reference.remote("compute_logprobs", batch_ref) if reference is not None else None
            values_refs = critic.remote("compute_values", batch_ref) if critic is not None else None
            trainer_logprobs = ray.get(old_refs)[0] if check else None
            train_batch.old_logprobs = (train_batch.rollout_logprobs * train_batch.response_mask
                                        if rollout_old else trainer_logprobs)
            train_batch.ref_logprobs = ray.get(ref_refs)[0] if ref_refs else None
            train_batch.values = ray.get(values_refs)[0] if values_refs else None
        if trainer_logprobs is not None:  # the engine vs the trainer on the same weights
            metrics |= logprob_gap(train_batch, trainer_logprobs)
        with stage(times, "advantage"), driver.span("advantage", rows=len(train_batch)):
            metrics |= compute_advantages(train_batch, cfg)
        update_ref = ray.put(train_batch)  # with the advantages (and returns): one copy for both groups
        if critic is not None:
            with stage(times, "critic_update"):
                metrics |= critic.call("update", update_ref)[0]  # the same on every rank
        with stage(times, "update"):
            metrics |= actor.call("update", update_ref)[0]  # the same on every rank
        return metrics

    bar = tqdm(range(first_step, cfg.train.steps + 1), desc=cfg.algorithm.advantage, disable=not progress,
               dynamic_ncols=True, initial=first_step - 1, total=cfg.train.steps)
    for step in bar:
        times: dict[str, float] = {}
        with timer(times, "step"):

            engine_stats = []  # of each round's generate call

            def generate_round(r: int) -> Round:
                """Round r of this step: fresh prompts, sampled, scored and shaped; group ids offset by r * P."""
                ids = sampler.next(cfg.train.prompts_per_step)
                params = dataclasses.replace(sampling, seed=round_seed(cfg.seed, step, r))
                with stage(times, "rollout"):
                    samples = generate([prompt(task.train[i]) for i in ids], params)
                    stats = rollout.call("stats")
                    engine_stats.append(None if stats[0] is None else sum(stats[1:], stats[0]))
                    batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
                with stage(times, "reward"), driver.span("reward", rows=len(samples)):
                    truths = [task.train[ids[s.prompt_index]].answer for s in samples]
                    scores, timeouts = scorer([s.text for s in samples], truths)
                    return prepare_round(batch, samples, torch.tensor(scores), cfg,
                                         group_offset=r * cfg.train.prompts_per_step, timeouts=timeouts)

            if channel is not None:  # pipelined: micro-batches flow into the update while generation goes on
                generation, ahead = ahead or generation_of(step), None

                def generate_ahead() -> None:
                    """One-step off-policy: step + 1 starts sampling (with these weights) once this step's groups
                    are all in, while this step trains; a checkpoint keeps the sampler as it was before."""
                    nonlocal ahead, sampler_before_ahead
                    if off_policy and step < cfg.train.steps:
                        sampler_before_ahead = sampler.state()
                        ahead = generation_of(step + 1)

                ids = generation.prompt_ids
                with stage(times, "pipeline"):
                    streamed = streamed_step(
                        cfg, generation, actor, reference, channel,
                        lambda samples: scorer([s.text for s in samples], [task.train[ids[s.prompt_index]].answer
                                                                           for s in samples]),
                        # (off-policy, the engine's weights are a step behind the trainer's: nothing to check)
                        tokenizer.pad_token_id, rollout_old, check_logprobs(step) and not off_policy, driver,
                        generate_ahead)
                engine_stats.append(streamed.engine_stats)
                rounds, train_batch = streamed.rounds, streamed.train_batch
                filter_metrics, train_metrics = streamed.filter_metrics, streamed.train_metrics
            else:  # stage by stage over the whole batch
                rounds, train_batch, filter_metrics = collect_batch(generate_round, cfg, tokenizer.pad_token_id)
                train_metrics = learn(train_batch, step, times) if len(train_batch) else {}
            if len(train_batch):
                with stage(times, "weight_sync"):
                    train_metrics |= sync_weights(step)
            else:  # no update, the same weights: the engines only take the new version number
                loading.extend(rollout.remote("set_policy_version", step))
                if not off_policy:
                    ray.get(loading)
                    loading.clear()

        with stage({}, "timeline"):  # what every worker did this step, when (timeline.jsonl; `m2flow report`)
            drained = [g for g in groups if channel is None or g is not rollout]  # a pipeline's came with its calls
            append_spans(timeline_path, step, driver.drain() + (streamed.rollout_spans if channel is not None else [])
                         + [s for g in drained for spans in g.call("drain_timeline") for s in spans])
        samples = [s for r in rounds for s in r.samples]
        metrics = {**batch_metrics(rounds, train_batch, cfg, step), **filter_metrics, **train_metrics, **times}
        if engine_stats[0] is not None:  # m2flow's engine: prefix sharing, preemptions, decode batch size
            metrics |= sum(engine_stats[1:], engine_stats[0]).metrics()
        totals["samples"] += len(samples)
        totals["tokens"] += int(sum(r.lengths.sum() for r in rounds))
        totals["seconds"] += times["time/step"]
        metrics["throughput/samples_per_s"] = len(samples) / times["time/step"]
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
            metrics.update(eval_metrics(held_out_eval(), benchmark_eval(step)))
        metrics_log.log(step, metrics)
        check_bad_steps(metrics, step, cfg)  # before a checkpoint: a diverging run is not saved as resumable
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != cfg.train.steps:
            with stage(times, "checkpoint"):
                save_checkpoint(step)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", len=f"{metrics['response/length_mean']:.0f}",
                        s=f"{times['time/step']:.1f}")

    with stage({}, "weight_sync"):
        ray.get(loading)  # the last step's weights are in the engines
    after, benchmarks_after = held_out_eval(), benchmark_eval(cfg.train.steps)
    metrics_log.log(cfg.train.steps, eval_metrics(after, benchmarks_after))
    metrics_log.close()
    with stage({}, "checkpoint"):
        final_dir = actor.call("save_checkpoint", os.path.join(run_dir, "checkpoints", "final"))[0]
    plot_metrics(metrics_log.path, os.path.join(run_dir, "metrics.png"),
                 ["reward/mean", "eval/accuracy", "eval/worked_share", "response/length_mean", "actor/entropy", "actor/pg_clip_frac",
                  "actor/grad_norm", "time/step"])
    summary = {
        "run_dir": run_dir,
        "held_out_problems": len(held_out),
        "held_out_accuracy_before": before.accuracy,
        "held_out_accuracy_after": after.accuracy,
        "held_out_gain": after.accuracy - before.accuracy,
        "held_out_by_kind_before": before.by_kind,
        "held_out_by_kind_after": after.by_kind,
        **{f"held_out_{k}_before": v for k, v in before.extra.items()},
        **{f"held_out_{k}_after": v for k, v in after.extra.items()},
        **({"benchmarks_before": benchmarks_before, "benchmarks_after": benchmarks_after} if task.benchmarks else {}),
        "held_out_response_tokens_before": before.mean_response_tokens,
        "held_out_response_tokens_after": after.mean_response_tokens,
        "base_model": {"path": model_path, **base_info},
        "rl_steps": cfg.train.steps,
        "skipped_rows": skipped,
        "rl_seconds": totals["seconds"],
        "rl_samples_per_s": totals["samples"] / max(totals["seconds"], 1e-9),
        "rl_tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9),
        "total_seconds": time.time() - t_start,
        "resumed_from": checkpoint,
        "final_checkpoint": final_dir,
        "examples_after": after.examples,
    }
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _warn_config_changes(cfg: Config, saved_path: str) -> None:
    """Logs the settings in which `cfg` differs from the run's saved config.yaml (a resumed run then continues
    under changed settings and will not match a straight run)."""
    from m2flow.config import config_to_dict, load_config

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    try:
        old = flat(config_to_dict(load_config(saved_path)))
    except Exception as e:  # noqa: BLE001 (an unreadable old config only loses this warning)
        log.warning("could not compare with %s: %s", saved_path, e)
        return
    new = flat(config_to_dict(cfg))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if k != "resume" and old.get(k) != new.get(k)]
    if changed:
        log.warning("resuming with settings changed from %s (the run will not match a straight run): %s",
                    saved_path, "; ".join(changed))


def _log_to_file(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)

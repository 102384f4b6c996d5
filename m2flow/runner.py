"""A run: its set-up (the base model, Ray, the devices and the placement, the worker groups), the RL loop over
`Flow.iteration` (the macro flow, in flow.py) and its bookkeeping (evaluation, metrics, timeline, checkpoints,
summary). The data is in data/task.py, the stages' pure functions in stages.py, failure handling in faults.py and
resumable checkpoints in resume.py."""

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

from m2flow.config import CRITIC_ESTIMATORS, BaseModelConfig, Config, save_config, validate
from m2flow.data.task import Task, drop_long_prompts, engine_max_len, load_task
from m2flow.data.templates import format_prompt
from m2flow.eval import EvalResult, evaluate
from m2flow.eval.in_training import GenerateOnly, benchmark_metrics
from m2flow.eval.run import Protocol
from m2flow.faults import NonFiniteTrainingError, StageError, check_bad_steps, stage, write_status
from m2flow.flow import Flow
from m2flow.io import atomic_write_text
from m2flow.metrics import MetricsLogger, plot_metrics
from m2flow.models.hub import resolve_model_path
from m2flow.pipeline import streamable
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
from m2flow.scheduler.channel import Channel
from m2flow.scheduler.context import DeviceTable, switch_specs
from m2flow.scheduler.group import WorkerGroup, rank_group
from m2flow.scheduler.placement import resolve_placement
from m2flow.scheduler.workers import (
    ActorWorker,
    CriticWorker,
    InferenceWorker,
    ReferenceWorker,
    RolloutWorker,
    Start,
)
from m2flow.stages import batch_metrics, old_logprobs_from_rollout
from m2flow.timeline import Recorder, append_spans, drop_spans_after, memory_metrics
from m2flow.training.warm_start import ensure_base_model

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
    worker groups placed over `devices` by cluster.placement."""
    plan = resolve_placement(cfg.cluster.placement, len(devices))
    log.info("placement: %s", plan.describe())
    on = lambda role: [devices[i] for i in plan.devices[role]]  # noqa: E731 (a role's devices)
    table = DeviceTable(str(os.getpid()), cfg.cluster.device_memory_gb)  # the devices' locks and memory ledger
    if workers is not None:
        workers.append(table.actor)
    rollout_old = old_logprobs_from_rollout(cfg)
    # old logprobs from a trainer pass run on the inference devices, where those are apart from the actor's
    inference_apart = not rollout_old and set(plan.devices["inference"]) != set(plan.devices["actor"])
    # the groups this run has, by the placement role whose devices they run on; those sharing devices take turns
    roles = {"rollout": "rollout", "actor": "actor", "inference": "inference" if inference_apart else None,
             "reference": "inference" if cfg.algorithm.kl_coef > 0 else None,
             "critic": "critic" if cfg.algorithm.advantage in CRITIC_ESTIMATORS else None}
    switching = cfg.cluster.context_switch
    if switching is None:  # on GPUs; on CPU devices host and device memory are one: nothing to move
        switching = devices[0].gpu is not None
    switches = switch_specs(table, {g: plan.devices[r] for g, r in roles.items() if r}, switching)
    replicas = cfg.rollout.replicas  # engine replicas, data-parallel
    start = Start.of(model_path, cfg)  # what every worker starts from
    rollout = WorkerGroup(RolloutWorker, replicas, start, cfg.rollout, name=f"rollout-{os.getpid()}",
                          placements=place(replicas, on("rollout")), rank_kwargs=lambda r: {"rank": r},
                          switch=switches["rollout"])
    ranks = cfg.train.ranks  # each trainer group: FSDP2 over a gloo group of this many ranks, data parallel

    def trainer_group(cls, group: str, rendezvous: str, *args) -> WorkerGroup:
        """`ranks` ranks of `cls(start, *args)` over the devices of `group`'s placement role, forming a process
        group of their own through the file store run_dir/`rendezvous` (no port)."""
        return rank_group(cls, ranks, start, *args, name=f"{group}-{os.getpid()}",
                          placements=place(ranks, on(roles[group])), store=os.path.join(run_dir, rendezvous),
                          switch=switches[group])

    temperature = cfg.rollout.temperature  # the trainers' logprobs are those of the distribution sampled
    actor = trainer_group(ActorWorker, "actor", ".trainer-rendezvous", cfg.train, cfg.algorithm, temperature)
    reference = (trainer_group(ReferenceWorker, "reference", ".reference-rendezvous", cfg.train, temperature)
                 if roles["reference"] else None)
    inference = (trainer_group(InferenceWorker, "inference", ".inference-rendezvous", cfg.train, temperature)
                 if roles["inference"] else None)
    critic = (trainer_group(CriticWorker, "critic", ".critic-rendezvous", cfg.train, cfg.critic, cfg.algorithm)
              if roles["critic"] else None)
    groups = [g for g in (rollout, actor, reference, critic, inference) if g is not None]
    if workers is not None:
        workers.extend(r for g in groups for r in g.ranks)
    if any(s.shared for s in switches.values()):
        log.info("context switching: %s take turns on their shared devices",
                 ", ".join(g for g, s in switches.items() if s.shared))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    scorer = RewardScorer(get_reward(cfg.reward.name), cfg.reward.timeout_s, timeout_score(cfg.reward.format_penalty),
                          {"format_penalty": cfg.reward.format_penalty}, pool)
    prompt = lambda p: format_prompt(p.question, tokenizer, cfg.data.template)  # noqa: E731
    log.info("old logprobs: %s", "the rollout engine's (train.old_logprobs=recompute for a trainer pass)"
             if rollout_old else "a trainer pass on the inference devices" if inference_apart else "a trainer pass")
    channel = None  # a pipelined placement's: rollout groups, from the replicas to the driver, as they finish
    if plan.mode != "collocated":
        why_not = streamable(cfg, rollout_old, inference_apart)
        if why_not:
            log.warning("placement %s: the update waits for the whole batch, as collocated: %s", plan.mode, why_not)
        else:
            channel = Channel(f"rollout-{os.getpid()}", capacity=cfg.train.prompts_per_step)
            if workers is not None:
                workers.append(channel.queue)
    driver = Recorder("driver")  # the driver's own stages (reward, advantage) on the timeline
    flow = Flow(cfg, rollout, actor, reference, critic, task, tokenizer, prompt, scorer, channel, driver, inference)
    held_out = task.held_out[: cfg.eval.num_problems]
    held_out_prompts = [prompt(p) for p in held_out]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    protocol = Protocol(k=cfg.eval.k, temperature=cfg.eval.temperature,
                        top_p=cfg.eval.top_p if cfg.eval.temperature > 0 else 1.0,
                        max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed, template=cfg.data.template,
                        batch_size=cfg.rollout.engine.max_num_seqs)

    def held_out_eval() -> EvalResult:
        with stage({}, "eval"):
            return evaluate(flow.generate, held_out, held_out_prompts, greedy,
                            score_batch=lambda rs, ts: scorer(rs, ts)[0], response_metrics=task.response_metrics)

    benchmark_engine = GenerateOnly(flow.generate, tokenizer, engine_max_len(model_path))

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
            flow.sync_weights(state["policy_version"])
            flow.wait_for_loads()
        flow.sampler.load_state(state["sampler"])
        set_rng_state(state["rng"])
        before, totals, first_step = EvalResult(**state["before"]), state["totals"], state["step"] + 1
        benchmarks_before = state.get("benchmarks_before", {})
        metrics_log = MetricsLogger(run_dir, resume_after=state["step"])  # drops rows logged after the checkpoint
        drop_spans_after(timeline_path, state["step"])
        log.info("resumed at step %d of %d", first_step, cfg.train.steps)
        if flow.off_policy:
            log.warning("algorithm.max_staleness=1: the resumed run samples step %d with the checkpoint's weights, "
                        "where the straight run used the step before's; it continues close to, not exactly as, "
                        "the straight run", first_step)

    def save_checkpoint(step: int) -> None:
        def write_parts(tmp: str) -> None:
            ray.get([*actor.remote("save_state", tmp)] +
                    (critic.remote("save_state", os.path.join(tmp, CRITIC)) if critic is not None else []))
        write_checkpoint(run_dir, step, write_parts, {
            "policy_version": step, "sampler": flow.sampler_state(), "rng": rng_state(), "totals": totals,
            "before": dataclasses.asdict(before), "benchmarks_before": benchmarks_before, "base_model": model_path},
            cfg.checkpoint.keep_last)

    bar = tqdm(range(first_step, cfg.train.steps + 1), desc=cfg.algorithm.advantage, disable=not progress,
               dynamic_ncols=True, initial=first_step - 1, total=cfg.train.steps)
    for step in bar:
        it = flow.iteration(step)
        with stage({}, "timeline"):  # what every worker did this step, when (timeline.jsonl; `m2flow report`)
            drained = [g for g in groups if channel is None or g is not rollout]  # a pipeline's came with its calls
            spans = [*driver.drain(), *it.spans, *(s for g in drained for ss in g.call("drain_timeline") for s in ss)]
            append_spans(timeline_path, step, spans)
        samples = [s for r in it.rounds for s in r.samples]
        metrics = {**batch_metrics(it.rounds, it.train_batch, cfg, step), **it.metrics, **memory_metrics(spans),
                   **table.metrics()}
        seconds = metrics["time/step"]
        totals["samples"] += len(samples)
        totals["tokens"] += int(sum(r.lengths.sum() for r in it.rounds))
        totals["seconds"] += seconds
        metrics["throughput/samples_per_s"] = len(samples) / seconds
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
            metrics.update(eval_metrics(held_out_eval(), benchmark_eval(step)))
        metrics_log.log(step, metrics)
        check_bad_steps(metrics, step, cfg)  # before a checkpoint: a diverging run is not saved as resumable
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != cfg.train.steps:
            with stage({}, "checkpoint"):
                save_checkpoint(step)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", len=f"{metrics['response/length_mean']:.0f}",
                        s=f"{seconds:.1f}")

    with stage({}, "weight_sync"):
        flow.wait_for_loads()  # the last step's weights are in the engines (one-step off-policy)
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

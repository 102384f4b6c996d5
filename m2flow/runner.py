"""The macro flow. One RL iteration reads top to bottom:

    rollout -> reward -> filter -> logprobs (actor old / reference / critic values) -> advantage
            -> update (critic, actor) -> weight sync

(Reward and the group filter come before the logprob pass because they are cheap and tell which groups carry
a gradient: with `algorithm.filter_groups`, groups whose samples all got the same reward are dropped before the
trainer spends compute on them; with `algorithm.dynamic_sampling_max_tries > 1`, more prompts are sampled until
`train.prompts_per_step` informative groups are found. Advantages come after the logprob pass because KL in the
reward and GAE need the reference logprobs and the critic's values.)

Everything else here is set-up (data, base model, workers) and bookkeeping (metrics, checkpoints, summary).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import socket
import time
from contextlib import contextmanager

import numpy as np
import ray
import torch
from tqdm import tqdm

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
from m2flow.config import CRITIC_ESTIMATORS, BaseModelConfig, Config, save_config, validate
from m2flow.data.datasets import BadRowError, DataError, Problem, load_problems
from m2flow.data.synthetic import TaskSpec, make_splits
from m2flow.data.templates import format_prompt
from m2flow.eval import EvalResult, evaluate
from m2flow.eval.in_training import GenerateOnly, benchmark_metrics
from m2flow.eval.run import Protocol
from m2flow.io import atomic_write_text
from m2flow.metrics import MetricsLogger, plot_metrics
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
from m2flow.scheduler.cluster import launch, start_ray, stop_ray
from m2flow.scheduler.group import WorkerGroup, generate_on_replicas
from m2flow.scheduler.workers import ActorWorker, CriticWorker, ReferenceWorker, RolloutWorker
from m2flow.training.warm_start import ensure_base_model

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Task:
    train: list[Problem]  # RL prompts (answers only are needed)
    held_out: list[Problem]  # never trained on
    sft: list[Problem]  # worked solutions for the base model's warm start (synthetic task only)
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # split -> "file:line: reason" (data.bad_rows=skip)
    benchmarks: list = dataclasses.field(default_factory=list)  # eval.benchmarks, loaded (m2flow.eval.benchmarks)
    response_metrics: object = None  # the task's own measures of responses (the synthetic task's worked share)


def load_task(cfg: Config) -> Task:
    """The train and held-out problems (files or synthetic). A missing or empty file, or a malformed row with
    data.bad_rows=error, raises DataError naming the file (and line)."""
    d = cfg.data
    synthetic = None
    if not (d.train_path and d.eval_path and cfg.model.path):
        sizes = {"eval": d.synthetic_eval_size, "sft": cfg.base.sft_examples, "rl": d.synthetic_train_size}
        spec = TaskSpec(max_operand=d.synthetic_max_operand, max_multiplier=d.synthetic_max_multiplier)
        sft_spec = dataclasses.replace(spec, direct_fraction=cfg.base.sft_direct_fraction)
        synthetic = make_splits(sizes, seed=d.synthetic_seed, spec=spec, split_specs={"sft": sft_spec})
    skipped: dict[str, list[str]] = {"train": [], "eval": []}

    def load(path: str, split: str) -> list[Problem]:
        try:
            return load_problems(path, d.prompt_key, d.answer_key,
                                 skipped=skipped[split] if d.bad_rows == "skip" else None)
        except BadRowError as e:
            raise DataError(f"{e}; fix the row, or set data.bad_rows=skip to skip such rows (they are counted "
                            f"in summary.json)") from None

    from m2flow.data.synthetic import response_metrics
    from m2flow.eval.benchmarks import load_benchmark

    return Task(
        train=load(d.train_path, "train") if d.train_path else synthetic["rl"],
        held_out=load(d.eval_path, "eval") if d.eval_path else synthetic["eval"],
        sft=synthetic["sft"] if synthetic else [],
        skipped=skipped,
        benchmarks=[load_benchmark(n, cfg.eval.data_dir, cfg.eval.benchmark_problems) for n in cfg.eval.benchmarks],
        response_metrics=None if d.eval_path else response_metrics,
    )


def engine_max_len(model_path: str) -> int:
    """The rollout engine's cap on prompt + response tokens: the model's max_position_embeddings (what the
    engine uses when EngineConfig.max_model_len is 0, as the RolloutWorker leaves it)."""
    with open(os.path.join(model_path, "config.json")) as f:
        return int(json.load(f).get("max_position_embeddings", 4096))


def _prompt_tokens(problems: list[Problem], tokenizer, template: str, budget: int) -> list[int]:
    """Prompt tokens of each problem, as the engine counts them, where they may exceed `budget`; a prompt whose
    UTF-8 bytes plus a margin fit the budget is not tokenized (a token covers at least one byte), which keeps
    the check of 50k short prompts to a fraction of a second (0 stands for "fits")."""
    overhead = len(format_prompt("", tokenizer, template).encode()) + 8
    maybe_long = [i for i, p in enumerate(problems) if len(p.question.encode()) + overhead > budget]
    lengths = [0] * len(problems)
    if maybe_long:
        prompts = [format_prompt(problems[i].question, tokenizer, template) for i in maybe_long]
        for i, ids in zip(maybe_long, tokenizer(prompts, add_special_tokens=False)["input_ids"]):
            lengths[i] = len(ids)
    return lengths


def drop_long_prompts(task: Task, model_path: str, cfg: Config) -> Task:
    """Checks that every train (eval) prompt's tokens + rollout.max_new_tokens (eval.max_new_tokens) fit the
    engine's max length, before anything starts; a prompt that does not raises DataError naming its
    `file:line`, or with data.bad_rows=skip is dropped and counted in task.skipped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    limit = engine_max_len(model_path)
    splits = {"train": (task.train, "rollout.max_new_tokens", cfg.rollout.max_new_tokens),
              "eval": (task.held_out, "eval.max_new_tokens", cfg.eval.max_new_tokens)}
    kept = {}
    for split, (problems, key, new_tokens) in splits.items():
        lengths = _prompt_tokens(problems, tokenizer, cfg.data.template, limit - new_tokens)
        bad = [f"{p.where or f'{split} problem {i + 1}'}: {n} prompt tokens + {key}={new_tokens} > {limit} "
               f"(max_position_embeddings in {os.path.join(model_path, 'config.json')})"
               for i, (p, n) in enumerate(zip(problems, lengths)) if n + new_tokens > limit]
        if bad and cfg.data.bad_rows == "error":
            raise DataError(f"{len(bad)} {split} prompt(s) too long for the model, e.g. {bad[0]}; shorten them, "
                            f"lower {key}, or set data.bad_rows=skip to skip them (counted in summary.json)")
        kept[split] = [p for p, n in zip(problems, lengths) if n + new_tokens <= limit]
        task.skipped.setdefault(split, []).extend(bad)
        if not kept[split]:
            raise DataError(f"no {split} problem fits the model's max length {limit}, e.g. {bad[0] if bad else '-'}")
    for split, rows in task.skipped.items():
        if rows:
            log.warning("skipped %d malformed or too long %s rows (data.bad_rows=skip), e.g. %s",
                        len(rows), split, "; ".join(rows[:3]))
    return dataclasses.replace(task, train=kept["train"], held_out=kept["eval"])


class PromptSampler:
    """Epochs over the training problems in a seeded random order."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError(f"PromptSampler needs at least one problem, got n={n}")
        self.n, self.rng, self.order = n, random.Random(seed), []

    def next(self, k: int) -> list[int]:
        while len(self.order) < k:
            self.order += self.rng.sample(range(self.n), self.n)
        out, self.order = self.order[:k], self.order[k:]
        return out

    def state(self) -> dict:
        """Where the sampler is (JSON-serialisable): its RNG and the rest of the current epoch's order."""
        version, internal, gauss = self.rng.getstate()
        return {"n": self.n, "order": list(self.order), "rng": [version, list(internal), gauss]}

    def load_state(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"the sampler was saved over {state['n']} training problems, but the data now has "
                             f"{self.n}: the run cannot resume on different training data")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


@contextmanager
def timer(times: dict[str, float], name: str):
    """Adds the block's wall time to times["time/<name>"] (so several generation rounds add up)."""
    start = time.perf_counter()
    yield
    times[f"time/{name}"] = times.get(f"time/{name}", 0.0) + time.perf_counter() - start


def base_config(cfg: Config) -> BaseModelConfig:
    """cfg.base with its seed resolved (null = the run's seed)."""
    return cfg.base if cfg.base.seed is not None else dataclasses.replace(cfg.base, seed=cfg.seed)


class StageError(RuntimeError):
    """A stage of the iteration failed: the message is one line naming the stage and the worker; the original
    error is `cause` (for a Ray worker, its remote traceback is in str(cause))."""

    def __init__(self, stage_name: str, cause: BaseException):
        self.stage, self.cause, self.worker = stage_name, cause, _worker_name(cause)
        self.run_dir: str | None = None  # set by run(): where status.json records the failure
        original = getattr(cause, "cause", None) or cause  # a RayTaskError carries the worker's exception
        first = (str(original).strip().splitlines() or [""])[0]
        super().__init__(f"stage '{stage_name}' failed in {self.worker}: {type(original).__name__}: {first}")


def _worker_name(e: BaseException) -> str:
    """Which worker raised: a Ray actor's method (and pid), a reward worker process, or the driver."""
    from m2flow.rewards.limits import RewardError

    if isinstance(e, ray.exceptions.RayTaskError):
        title = (e.proctitle or e.function_name or "a Ray worker").removeprefix("ray::")
        return f"{title} (pid {e.pid})" if e.pid else title
    if isinstance(e, ray.exceptions.RayActorError):  # its process died: killed (OOM killer, kill -9) or crashed
        fields = dict(re.findall(r"^\s*(class_name|pid): (\S+)$", str(e), re.MULTILINE))
        if "class_name" in fields:
            return f"{fields['class_name']} (pid {fields.get('pid', '?')}), whose process died"
        return "a Ray actor whose process died" + (f" ({e.actor_id})" if getattr(e, "actor_id", None) else "")
    if isinstance(e, RewardError):
        return "a reward worker process"
    return "the driver"


@contextmanager
def stage(times: dict[str, float], name: str):
    """`timer(times, name)`, and an exception inside becomes a StageError naming the stage and the worker."""
    with timer(times, name):
        try:
            yield
        except (StageError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise StageError(name, e) from e


def write_status(run_dir: str, status: str, error: BaseException | None = None) -> None:
    """<run_dir>/status.json: running | completed | failed | interrupted, the error (stage, worker, message),
    the last periodic checkpoint (where to resume from) and the driver's host and pid."""
    periodic = periodic_checkpoints(run_dir)
    record: dict = {"status": status, "last_checkpoint": periodic[-1] if periodic else None,
                    "host": socket.gethostname(), "pid": os.getpid()}
    if error is not None:
        record |= {"error": str(error), "error_type": type(error).__name__,
                   "stage": getattr(error, "stage", None), "worker": getattr(error, "worker", None)}
    atomic_write_text(os.path.join(run_dir, "status.json"), json.dumps(record, indent=2))


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
    task = load_task(cfg)
    if cfg.model.path:
        model_path, base_info = cfg.model.path, {}
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
    # critic, collocated.
    started_ray = not ray.is_initialized()
    resources = start_ray(cfg.cluster)
    pool = RewardPool(cfg.reward.workers)  # reward scoring with a hard per-response time limit
    workers: list = []  # every Ray actor the run starts, killed when it ends however it ends
    try:
        summary = _train(cfg, run_dir, model_path, base_info, task, resources, progress, t_start, pool, checkpoint,
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
        if started_ray:
            stop_ray()


def _train(cfg: Config, run_dir: str, model_path: str, base_info: dict, task: Task, resources: dict,
           progress: bool, t_start: float, pool: RewardPool | None = None, checkpoint: str | None = None,
           workers: list | None = None) -> dict:
    """The RL loop (from step 1, or from the step after `checkpoint`, a periodic checkpoint of this run)."""
    threads = int(cfg.cluster.num_cpus or resources.get("CPU", 1))
    replicas = cfg.rollout.replicas  # engine replicas, data-parallel (each with its share of the threads)
    rollout = WorkerGroup(RolloutWorker, replicas, model_path, cfg, name=f"rollout-{os.getpid()}",
                          threads=max(threads // replicas, 1))
    actor = launch(ActorWorker, model_path, cfg, name=f"actor-{os.getpid()}", threads=threads)
    reference = (launch(ReferenceWorker, model_path, cfg, name=f"reference-{os.getpid()}", threads=threads)
                 if cfg.algorithm.kl_coef > 0 else None)
    critic = (launch(CriticWorker, model_path, cfg, name=f"critic-{os.getpid()}", threads=threads)
              if cfg.algorithm.advantage in CRITIC_ESTIMATORS else None)
    if workers is not None:
        workers.extend([*rollout.ranks, *(h for h in (actor, reference, critic) if h is not None)])
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

    generate = lambda ps, sp: generate_on_replicas(rollout, ps, sp)  # noqa: E731
    protocol = Protocol(k=cfg.eval.k, temperature=cfg.eval.temperature,
                        top_p=cfg.eval.top_p if cfg.eval.temperature > 0 else 1.0,
                        max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed, template=cfg.data.template,
                        batch_size=cfg.rollout.batch_size)

    def held_out_eval() -> EvalResult:
        with stage({}, "eval"):
            return evaluate(generate, held_out, held_out_prompts, greedy, score_batch=lambda rs, ts: scorer(rs, ts)[0],
                            response_metrics=task.response_metrics)

    def benchmark_eval(step: int) -> dict[str, dict[str, float]]:
        """eval.benchmarks with k samples per problem ({} without any); samples in <run_dir>/eval/step_N/."""
        if not task.benchmarks:
            return {}
        with stage({}, "eval"):
            return benchmark_metrics(GenerateOnly(generate, tokenizer, engine_max_len(model_path)), task.benchmarks,
                                     protocol, os.path.join(run_dir, "eval", f"step_{step:06d}"))

    def eval_metrics(result: EvalResult, benchmarks: dict[str, dict[str, float]]) -> dict[str, float]:
        return {"eval/accuracy": result.accuracy, "eval/response_tokens": result.mean_response_tokens,
                **{f"eval/{k}": v for k, v in result.extra.items()},
                **{f"eval/{b}/{m}": v for b, found in benchmarks.items() for m, v in found.items()}}

    skipped = {split: len(rows) for split, rows in task.skipped.items()}
    sampler = PromptSampler(len(task.train), cfg.seed)
    rollout_old = old_logprobs_from_rollout(cfg)
    log.info("old logprobs: %s", "the rollout engine's (train.old_logprobs=recompute for a trainer pass)"
             if rollout_old else "a trainer pass")
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
            ray.get([actor.load_state.remote(checkpoint)] +
                    ([critic.load_state.remote(os.path.join(checkpoint, CRITIC))] if critic else []))
            rollout.call("load_weights", actor.state_dict.remote(), state["policy_version"])
        sampler.load_state(state["sampler"])
        set_rng_state(state["rng"])
        before, totals, first_step = EvalResult(**state["before"]), state["totals"], state["step"] + 1
        benchmarks_before = state.get("benchmarks_before", {})
        metrics_log = MetricsLogger(run_dir, resume_after=state["step"])  # drops rows logged after the checkpoint
        log.info("resumed at step %d of %d", first_step, cfg.train.steps)

    def save_checkpoint(step: int) -> None:
        def write_parts(tmp: str) -> None:
            ray.get([actor.save_state.remote(tmp)] +
                    ([critic.save_state.remote(os.path.join(tmp, CRITIC))] if critic else []))
        write_checkpoint(run_dir, step, write_parts, {
            "policy_version": step, "sampler": sampler.state(), "rng": rng_state(), "totals": totals,
            "before": dataclasses.asdict(before), "benchmarks_before": benchmarks_before, "base_model": model_path},
            cfg.checkpoint.keep_last)

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
                with stage(times, "reward"):
                    truths = [task.train[ids[s.prompt_index]].answer for s in samples]
                    scores, timeouts = scorer([s.text for s in samples], truths)
                    return prepare_round(batch, samples, torch.tensor(scores), cfg,
                                         group_offset=r * cfg.train.prompts_per_step, timeouts=timeouts)

            rounds, train_batch, filter_metrics = collect_batch(generate_round, cfg, tokenizer.pad_token_id)
            train_metrics = {}
            if len(train_batch):
                with stage(times, "logprobs"):
                    # the trainer's pass is skipped when the engine's logprobs are the old ones (but for a check)
                    check = not rollout_old or (cfg.train.logprob_check_every > 0
                                                and step % cfg.train.logprob_check_every == 0)
                    old_ref = actor.compute_logprobs.remote(train_batch) if check else None
                    ref_ref = reference.compute_logprobs.remote(train_batch) if reference else None
                    values_ref = critic.compute_values.remote(train_batch) if critic else None
                    trainer_logprobs = ray.get(old_ref) if check else None
                    train_batch.old_logprobs = (train_batch.rollout_logprobs * train_batch.response_mask
                                                if rollout_old else trainer_logprobs)
                    train_batch.ref_logprobs = ray.get(ref_ref) if ref_ref else None
                    train_batch.values = ray.get(values_ref) if values_ref else None
                if trainer_logprobs is not None:  # the engine vs the trainer on the same weights
                    train_metrics |= logprob_gap(train_batch, trainer_logprobs)
                with stage(times, "advantage"):
                    train_metrics |= compute_advantages(train_batch, cfg)
                if critic is not None:
                    with stage(times, "critic_update"):
                        train_metrics |= ray.get(critic.update.remote(train_batch))
                with stage(times, "update"):
                    train_metrics |= ray.get(actor.update.remote(train_batch))
                with stage(times, "weight_sync"):
                    rollout.call("load_weights", actor.state_dict.remote(), step)  # each replica fetches it

        samples = [s for r in rounds for s in r.samples]
        metrics = {**_batch_metrics(rounds, train_batch, cfg), **filter_metrics, **train_metrics, **times}
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

    after, benchmarks_after = held_out_eval(), benchmark_eval(cfg.train.steps)
    metrics_log.log(cfg.train.steps, eval_metrics(after, benchmarks_after))
    metrics_log.close()
    with stage({}, "checkpoint"):
        final_dir = ray.get(actor.save_checkpoint.remote(os.path.join(run_dir, "checkpoints", "final")))
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


# ---------------------------------------------------------------------------------------------------------
# The stages between rollout and update, as plain functions of tensors and the config (tested one by one)


@dataclasses.dataclass
class Round:
    """One generation round of a step (a step has several with dynamic sampling)."""

    batch: RolloutBatch  # scores shaped, response mask overlong-filtered, group ids unique within the step
    samples: list  # the engine's Samples, in batch order
    raw_scores: torch.Tensor  # [B] the reward function's scores before shaping
    lengths: torch.Tensor  # [B] response tokens, before overlong filtering
    overlong_penalty: torch.Tensor | None  # [B] soft overlong punishment added to the scores (None: off)
    timeouts: int = 0  # responses whose scoring ran past reward.timeout_s (scored -reward.format_penalty)


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


def _batch_metrics(rounds: list[Round], train_batch: RolloutBatch, cfg: Config) -> dict[str, float]:
    samples = [s for r in rounds for s in r.samples]
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
    }
    if cfg.reward.overlong_buffer > 0 or cfg.reward.scale != 1.0 or cfg.reward.clip is not None:
        out["reward/shaped_mean"] = float(torch.cat([r.batch.scores for r in rounds]).mean())
    if cfg.reward.overlong_buffer > 0:
        out["reward/overlong_penalty_mean"] = float(torch.cat([r.overlong_penalty for r in rounds]).mean())
    if cfg.algorithm.overlong_filter and len(train_batch):
        out["batch/overlong_masked_frac"] = float((train_batch.response_mask.sum(1) == 0).float().mean())
    return out


class NonFiniteTrainingError(RuntimeError):
    """train.max_bad_steps optimizer steps in a row had a non-finite loss or gradient norm."""


def check_bad_steps(metrics: dict[str, float], step: int, cfg: Config) -> None:
    """Stops the run (NonFiniteTrainingError naming the step) once the actor or the critic has skipped
    train.max_bad_steps optimizer steps in a row for a non-finite loss or gradient norm."""
    for trainer, lr in (("actor", cfg.train.lr), ("critic", cfg.critic.lr)):
        bad = int(metrics.get(f"{trainer}/bad_steps_in_a_row", 0))
        if bad >= cfg.train.max_bad_steps:
            raise NonFiniteTrainingError(
                f"RL step {step}: the {trainer}'s last {bad} optimizer steps had a non-finite loss or gradient norm "
                f"(train.max_bad_steps={cfg.train.max_bad_steps}); they were skipped, so its weights are those of "
                f"the last good step. Lower the learning rate (now {lr:g}) or look for non-finite rewards or "
                f"advantages in metrics.jsonl")


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

"""The macro flow. One RL iteration reads top to bottom:

    rollout -> reward -> advantage -> logprobs -> update -> weight sync

(Reward and advantage come before the logprob pass because they are cheap and tell which groups carry a
gradient: with `algorithm.filter_groups`, groups whose samples all got the same reward are dropped before the
trainer spends compute on them.)

Everything else here is set-up (data, base model, workers) and bookkeeping (metrics, checkpoints, summary).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from contextlib import contextmanager

import numpy as np
import ray
import torch
from tqdm import tqdm

from m2flow.algorithms import ADVANTAGE_ESTIMATORS
from m2flow.batch import RolloutBatch
from m2flow.config import Config, save_config, validate
from m2flow.data.datasets import Problem, load_problems
from m2flow.data.synthetic import TaskSpec, make_splits
from m2flow.data.templates import format_prompt
from m2flow.eval import EvalResult, evaluate
from m2flow.io import atomic_write_text
from m2flow.metrics import MetricsLogger, plot_metrics
from m2flow.rewards import get_reward
from m2flow.rollout import SamplingParams
from m2flow.scheduler.cluster import launch, start_ray
from m2flow.scheduler.workers import ActorWorker, ReferenceWorker, RolloutWorker
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


def load_task(cfg: Config) -> Task:
    d = cfg.data
    synthetic = None
    if not (d.train_path and d.eval_path and cfg.model.path):
        sizes = {"eval": d.synthetic_eval_size, "sft": cfg.base.sft_examples, "rl": d.synthetic_train_size}
        spec = TaskSpec(max_operand=d.synthetic_max_operand)
        sft_spec = dataclasses.replace(spec, direct_fraction=cfg.base.sft_direct_fraction)
        synthetic = make_splits(sizes, seed=d.synthetic_seed, spec=spec, split_specs={"sft": sft_spec})
    load = lambda p: load_problems(p, d.prompt_key, d.answer_key)  # noqa: E731
    return Task(
        train=load(d.train_path) if d.train_path else synthetic["rl"],
        held_out=load(d.eval_path) if d.eval_path else synthetic["eval"],
        sft=synthetic["sft"] if synthetic else [],
    )


class PromptSampler:
    """Epochs over the training problems in a seeded random order."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def next(self, k: int) -> list[int]:
        while len(self.order) < k:
            self.order += self.rng.sample(range(self.n), self.n)
        out, self.order = self.order[:k], self.order[k:]
        return out


@contextmanager
def timer(times: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    times[f"time/{name}"] = time.perf_counter() - start


def make_run_dir(cfg: Config) -> str:
    path = os.path.join(cfg.output_dir, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(path, exist_ok=False)
    return path


def run(cfg: Config, progress: bool = True) -> dict:
    """Runs the experiment described by `cfg`; returns the summary (also written to summary.json)."""
    validate(cfg)  # a Config built in Python gets the same checks as one loaded from YAML
    seed_everything(cfg.seed)
    run_dir = make_run_dir(cfg)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    _log_to_file(os.path.join(run_dir, "log.txt"))
    log.info("run directory: %s", run_dir)
    t_start = time.time()

    task = load_task(cfg)
    if cfg.model.path:
        model_path, base_info = cfg.model.path, {}
    else:
        model_path, base_info = ensure_base_model(cfg.base, task.sft, task.held_out[: cfg.eval.num_problems],
                                                  cfg.data.template, cfg.eval.max_new_tokens, progress)

    # Workers: rollout engine, trainer and (only with a KL term) the frozen reference, collocated.
    started_ray = not ray.is_initialized()
    resources = start_ray(cfg.cluster)
    try:
        return _train(cfg, run_dir, model_path, base_info, task, resources, progress, t_start)
    finally:  # a crashed worker surfaces as its exception here; the last checkpoint was written atomically
        if started_ray:
            ray.shutdown()


def _train(cfg: Config, run_dir: str, model_path: str, base_info: dict, task: Task, resources: dict,
           progress: bool, t_start: float) -> dict:
    threads = int(cfg.cluster.num_cpus or resources.get("CPU", 1))
    rollout = launch(RolloutWorker, model_path, cfg, name=f"rollout-{os.getpid()}", threads=threads)
    actor = launch(ActorWorker, model_path, cfg, name=f"actor-{os.getpid()}", threads=threads)
    reference = (launch(ReferenceWorker, model_path, cfg, name=f"reference-{os.getpid()}", threads=threads)
                 if cfg.algorithm.kl_coef > 0 else None)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    reward_fn = get_reward(cfg.reward.name)
    score = lambda text, truth: reward_fn(  # noqa: E731
        text, truth, format_penalty=cfg.reward.format_penalty, timeout_s=cfg.reward.timeout_s)
    advantage_fn = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage)
    prompt = lambda p: format_prompt(p.question, tokenizer, cfg.data.template)  # noqa: E731
    held_out = task.held_out[: cfg.eval.num_problems]
    held_out_prompts = [prompt(p) for p in held_out]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    sampling = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)

    def held_out_eval() -> EvalResult:
        generate = lambda ps, sp: ray.get(rollout.generate.remote(ps, sp))  # noqa: E731
        return evaluate(generate, held_out, held_out_prompts, greedy, reward_fn)

    def eval_metrics(result: EvalResult) -> dict[str, float]:
        return {"eval/accuracy": result.accuracy, "eval/worked_share": result.worked_share,
                "eval/response_tokens": result.mean_response_tokens}

    metrics_log = MetricsLogger(run_dir)
    before = held_out_eval()
    metrics_log.log(0, eval_metrics(before))
    log.info("held-out accuracy before RL: %.3f", before.accuracy)
    sampler = PromptSampler(len(task.train), cfg.seed)
    totals = {"samples": 0, "tokens": 0, "seconds": 0.0}
    bar = tqdm(range(1, cfg.train.steps + 1), desc="grpo", disable=not progress, dynamic_ncols=True)
    for step in bar:
        times: dict[str, float] = {}
        with timer(times, "step"):
            ids = sampler.next(cfg.train.prompts_per_step)
            step_params = dataclasses.replace(sampling, seed=cfg.seed * 1_000_003 + step)

            with timer(times, "rollout"):
                samples = ray.get(rollout.generate.remote([prompt(task.train[i]) for i in ids], step_params))
                batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
            with timer(times, "reward"):
                truths = [task.train[ids[s.prompt_index]].answer for s in samples]
                batch.scores = torch.tensor([score(s.text, t) for s, t in zip(samples, truths)])
            with timer(times, "advantage"):
                batch.advantages = advantage_fn(batch.scores, batch.group_ids,
                                                norm_by_std=cfg.algorithm.norm_adv_by_std)
                informative = _informative_rows(batch) if cfg.algorithm.filter_groups else None
            train_batch = batch.select(informative) if informative is not None else batch
            train_metrics = {}
            if len(train_batch):
                with timer(times, "logprobs"):
                    old_ref = actor.compute_logprobs.remote(train_batch)
                    ref_ref = reference.compute_logprobs.remote(train_batch) if reference else None
                    train_batch.old_logprobs = ray.get(old_ref)
                    train_batch.ref_logprobs = ray.get(ref_ref) if ref_ref else None
                with timer(times, "update"):
                    train_metrics = ray.get(actor.update.remote(train_batch))
                with timer(times, "weight_sync"):
                    ray.get(rollout.load_weights.remote(actor.state_dict.remote(), step))

        metrics = {**_batch_metrics(batch, train_batch, samples), **train_metrics, **times}
        totals["samples"] += len(samples)
        totals["tokens"] += int(batch.response_mask.sum())
        totals["seconds"] += times["time/step"]
        metrics["throughput/samples_per_s"] = len(samples) / times["time/step"]
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
            metrics.update(eval_metrics(held_out_eval()))
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != cfg.train.steps:
            _save_periodic(actor, run_dir, step, cfg.checkpoint.keep_last)
        metrics_log.log(step, metrics)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", len=f"{metrics['response/length_mean']:.0f}",
                        s=f"{times['time/step']:.1f}")

    after = held_out_eval()
    metrics_log.log(cfg.train.steps, eval_metrics(after))
    metrics_log.close()
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
        "held_out_worked_share_before": before.worked_share,
        "held_out_worked_share_after": after.worked_share,
        "held_out_response_tokens_before": before.mean_response_tokens,
        "held_out_response_tokens_after": after.mean_response_tokens,
        "base_model": {"path": model_path, **base_info},
        "rl_steps": cfg.train.steps,
        "rl_seconds": totals["seconds"],
        "rl_samples_per_s": totals["samples"] / max(totals["seconds"], 1e-9),
        "rl_tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9),
        "total_seconds": time.time() - t_start,
        "final_checkpoint": final_dir,
        "examples_after": after.examples,
    }
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    for handle in (rollout, actor, reference):
        if handle is not None:
            ray.kill(handle)
    return summary


def _informative_rows(batch: RolloutBatch) -> torch.Tensor:
    """Rows whose group's rewards differ: the others have zero advantage and no policy gradient."""
    groups = batch.group_ids.tolist()
    rewards: dict[int, set[float]] = {}
    for g, r in zip(groups, batch.scores.tolist()):
        rewards.setdefault(g, set()).add(r)
    return torch.tensor([i for i, g in enumerate(groups) if len(rewards[g]) > 1], dtype=torch.long)


def _batch_metrics(batch: RolloutBatch, train_batch: RolloutBatch, samples) -> dict[str, float]:
    mask = batch.response_mask
    lengths = mask.sum(1)
    out = {"batch/informative_frac": len(train_batch) / len(batch)}
    if train_batch.old_logprobs is not None:  # rollout engine vs trainer on the same weights
        m = train_batch.response_mask
        diff = (train_batch.rollout_logprobs - train_batch.old_logprobs).abs() * m
        out["rollout/logprob_abs_diff"] = float(diff.sum() / m.sum().clamp(min=1))
    return out | {
        "reward/mean": float(batch.scores.mean()),
        "reward/accuracy": float((batch.scores >= 1).float().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
    }


def _save_periodic(actor, run_dir: str, step: int, keep_last: int) -> None:
    root = os.path.join(run_dir, "checkpoints")
    ray.get(actor.save_checkpoint.remote(os.path.join(root, f"step_{step:06d}")))
    periodic = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith((".tmp", ".old")))
    for old in periodic[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def _log_to_file(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)

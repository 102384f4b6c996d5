"""The trainer benchmark (`m2flow bench train`): the trainer's share of an RL step on the demo's workload,
padded micro-batches against packed ones (each prompt computed once per sample, and once for all its samples),
measured in the same run.

The workload is one real step of the demo: the base model samples `rollout.n` responses to
`train.prompts_per_step` training prompts (m2flow's engine, the config's sampling), math_reward scores them and
GRPO gives advantages (every group kept, as with algorithm.filter_groups=false). Each variant then runs, on a
fresh copy of the base model, the old-logprob pass and the update (one optimizer step) over that same batch, every
sequence computed; a last variant lets the update skip the sequences with advantage 0. The median of `repeats`
runs is reported, with tokens per second counting real tokens (prompt + response, no padding) so the variants
compare on the same work. On a shared machine, run it alone: other processes on the cores show up as slow
variants.

With `--devices 1,2` it measures scaling instead: the trainer with the config's settings as a worker group of d
ranks (FSDP2 over gloo, data parallel by tokens) on d logical CPU devices (scheduler/devices.py: each rank
pinned to its device's cores), for each d, on the same batch; trainer tokens/s and the ratio to the first d.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch

from m2flow.algorithms import grpo_advantages
from m2flow.batch import RolloutBatch
from m2flow.config import Config
from m2flow.io import atomic_write_text


def demo_workload(cfg: Config, model_path: str, prompts: list[str], answers: list[str]) -> RolloutBatch:
    """One step's scored rollout batch with GRPO advantages."""
    from m2flow.rewards import math_reward
    from m2flow.rollout import Engine, SamplingParams

    engine = Engine.from_pretrained(model_path, cfg.rollout.engine, dtype=cfg.model.dtype)
    r = cfg.rollout
    params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_new_tokens=r.max_new_tokens, seed=cfg.seed)
    samples = engine.generate(prompts, params)
    tokenizer = engine.tokenizer
    batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    batch.scores = torch.tensor([math_reward(s.text, answers[s.prompt_index]) for s in samples])
    batch.advantages = grpo_advantages(batch.scores, batch.group_ids)
    return batch


def time_variant(model, batch: RolloutBatch, cfg: Config, repeats: int, skip_zero_advantage: bool = False,
                 **train) -> dict:
    """Median seconds of the old-logprob pass and of the update for a fresh Actor per repeat (after one
    untimed warm-up run: allocator and thread pools). `skip_zero_advantage`: let the update skip sequences whose
    advantage is 0 (the Actor's default where it is exact); off, every sequence is computed."""
    from m2flow.training.actor import Actor

    train_cfg = dataclasses.replace(cfg.train, **train)
    logprob_s, update_s = [], []
    for i in range(repeats + 1):
        actor = Actor(copy.deepcopy(model), train_cfg, cfg.algorithm, temperature=cfg.rollout.temperature)
        actor.skip_zero_advantage &= skip_zero_advantage
        b = copy.deepcopy(batch)
        start = time.perf_counter()
        b.old_logprobs = actor.compute_logprobs(b)
        logprobs_time = time.perf_counter() - start
        start = time.perf_counter()
        actor.update(b)
        if i > 0:
            logprob_s.append(logprobs_time)
            update_s.append(time.perf_counter() - start)
    return {"logprobs_s": statistics.median(logprob_s), "update_s": statistics.median(update_s)}


def run_train_benchmark(cfg: Config, model_path: str, prompts: list[str], answers: list[str],
                        budgets: list[int], repeats: int, out_dir: str) -> dict:
    from m2flow.bench.learning import cpu_model
    from m2flow.training.checkpoint import load_hf_model
    from m2flow.training.packing import pack

    batch = demo_workload(cfg, model_path, prompts, answers)
    model, _ = load_hf_model(model_path, cfg.model.dtype)
    real = int(batch.attention_mask.sum())
    padded = batch.input_ids.numel()
    shared = int(pack(batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]).input_ids.shape[1])
    variants = {f"padded, micro_batch_size={cfg.train.micro_batch_size}":
                time_variant(model, batch, cfg, repeats, max_tokens_per_microbatch=0)}
    for budget in budgets:
        for share in (False, True):
            name = f"packed, max_tokens_per_microbatch={budget}, {'shared prompts' if share else 'a prompt per sample'}"
            variants[name] = time_variant(model, batch, cfg, repeats, max_tokens_per_microbatch=budget,
                                          share_prompts=share)
    if budgets:
        zero = int((batch.advantages == 0).sum())
        variants[f"packed, max_tokens_per_microbatch={budgets[0]}, shared prompts, the {zero} sequences with advantage "
                 "0 skipped"] = time_variant(model, batch, cfg, repeats, skip_zero_advantage=True,
                                             max_tokens_per_microbatch=budgets[0], share_prompts=True)
    base = next(iter(variants.values()))
    rows = []
    for name, v in variants.items():
        recompute = v["logprobs_s"] + v["update_s"]
        rows.append({"variant": name, **v, "trainer_s_recompute": recompute, "trainer_s_rollout_old": v["update_s"],
                     "update_tokens_per_s": real / v["update_s"],
                     "speedup_update": base["update_s"] / v["update_s"],
                     "speedup_step_vs_padded_recompute": (base["logprobs_s"] + base["update_s"]) / v["update_s"]})
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": model_path,
              "sequences": len(batch), "real_tokens": real, "padded_tokens": padded, "shared_prompt_tokens": shared,
              "padding_fraction": 1 - real / padded, "repeats": repeats, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"train-cpu-{os.cpu_count()}cores.json")
    atomic_write_text(path, json.dumps(result, indent=2))
    result["path"] = path
    return result


def time_devices(cfg: Config, model_path: str, batch: RolloutBatch, counts: list[int], repeats: int) -> list[dict]:
    """For each d in `counts`: the trainer as d ranks (train.ranks=d) on d logical devices (cluster.devices=d),
    Ray workers as in a run; median seconds of the old-logprob pass and of the update over `repeats` calls after a
    warm-up call (the update keeps training the group's weights: the same tokens each time)."""
    import ray

    from m2flow.scheduler.cluster import start_ray, stop_ray
    from m2flow.scheduler.devices import place, release_devices, run_devices
    from m2flow.scheduler.group import rank_group
    from m2flow.scheduler.workers import ActorWorker, Start

    started = not ray.is_initialized()
    start_ray(cfg.cluster)
    rows = []
    try:
        batch_ref = ray.put(batch)
        for d in counts:
            run_cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, devices=d),
                                          train=dataclasses.replace(cfg.train, ranks=d))
            devices = run_devices(run_cfg.cluster)
            group = rank_group(ActorWorker, d, Start.of(model_path, run_cfg), run_cfg.train, run_cfg.algorithm,
                               run_cfg.rollout.temperature, name=f"bench-train-{d}-{os.getpid()}",
                               placements=place(d, devices),
                               store=os.path.join(tempfile.mkdtemp(prefix="m2flow-bench-"), "rendezvous"))
            try:
                logprob_s, update_s = [], []
                prepared = None
                for i in range(repeats + 1):
                    start = time.perf_counter()
                    old = group.call("compute_logprobs", batch_ref)[0]
                    logprobs_time = time.perf_counter() - start
                    if prepared is None:
                        prepared = ray.put(dataclasses.replace(batch, old_logprobs=old))
                    start = time.perf_counter()
                    group.call("update", prepared)
                    if i > 0:
                        logprob_s.append(logprobs_time)
                        update_s.append(time.perf_counter() - start)
            finally:
                group.kill()
                release_devices(devices)
            rows.append({"devices": d, "ranks": d, "cores": [list(p.cores) for p in place(d, devices)],
                         "logprobs_s": statistics.median(logprob_s), "update_s": statistics.median(update_s)})
    finally:
        if started:
            stop_ray()
    real = int(batch.attention_mask.sum())
    for row in rows:
        row["update_tokens_per_s"] = real / row["update_s"]
        row["trainer_tokens_per_s"] = real / (row["logprobs_s"] + row["update_s"])
        row["scaling"] = row["trainer_tokens_per_s"] / rows[0]["trainer_tokens_per_s"]
    return rows


def run_devices_benchmark(cfg: Config, model_path: str, prompts: list[str], answers: list[str], counts: list[int],
                          repeats: int, out_dir: str) -> dict:
    from m2flow.bench.learning import cpu_model

    batch = demo_workload(cfg, model_path, prompts, answers)
    rows = time_devices(cfg, model_path, batch, counts, repeats)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "model": model_path, "sequences": len(batch),
              "real_tokens": int(batch.attention_mask.sum()), "repeats": repeats,
              "train": dataclasses.asdict(cfg.train), "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"train-devices-cpu-{os.cpu_count()}cores.json")
    atomic_write_text(path, json.dumps(result, indent=2))
    result["path"] = path
    return result


def format_devices_table(result: dict) -> str:
    lines = [f"{result['sequences']} sequences, {result['real_tokens']} real tokens, median of {result['repeats']}",
             "", "| devices (= trainer ranks) | cores per rank | old-logprob pass (s) | update (s) | trainer tokens/s "
             "(both passes) | scaling |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cores = " / ".join(",".join(map(str, c)) for c in r["cores"])
        lines.append(f"| {r['devices']} | {cores} | {r['logprobs_s']:.2f} | {r['update_s']:.2f} | "
                     f"{r['trainer_tokens_per_s']:.0f} | {r['scaling']:.2f}x |")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    lines = [f"{result['sequences']} sequences, {result['real_tokens']} real tokens "
             f"({result['padding_fraction']:.0%} of the padded layout is padding; {result['shared_prompt_tokens']} "
             f"with each prompt once), median of {result['repeats']}",
             "", "| variant | old-logprob pass (s) | update (s) | update tokens/s | update speed-up | trainer s/step, "
             "recompute / rollout old logprobs | speed-up vs padded + recompute |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['logprobs_s']:.2f} | {r['update_s']:.2f} | {r['update_tokens_per_s']:.0f} | "
                     f"{r['speedup_update']:.2f}x | {r['trainer_s_recompute']:.2f} / {r['trainer_s_rollout_old']:.2f} | "
                     f"{r['speedup_step_vs_padded_recompute']:.2f}x |")
    return "\n".join(lines)

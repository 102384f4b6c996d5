"""The RL loop on one GPU (issue 14): engine, FSDP2 trainer (float32 master weights, bfloat16 compute) and the
bucketed weight sync collocated on cuda:0, for 3 GRPO steps of a model with Qwen2.5-0.5B's architecture and
random weights, in bfloat16.

Marked `gpu` and deselected by default (`make test-gpu`, or benchmarks/gpu_check.sh on a GPU machine). It has
not run on a GPU yet: no session so far had one (the placement itself is tested on CPU with Ray's logical GPUs,
tests/test_scheduler_devices.py)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from m2flow.bench.rollout import build_model_dir
from m2flow.config import load_config
from m2flow.runner import run

pytestmark = pytest.mark.gpu


def test_three_grpo_steps_on_one_gpu_in_bfloat16(tmp_path):
    assert torch.cuda.is_available(), "this test needs a GPU"
    path, _ = build_model_dir("qwen2.5-0.5b", "bfloat16")
    cfg = load_config(None, [
        f"model.path={path}", "model.dtype=bfloat16", "cluster.device=cuda", "cluster.devices=1",
        "train.steps=3", "train.prompts_per_step=32", "rollout.n=8", "rollout.max_new_tokens=256",
        "algorithm.filter_groups=false", "train.old_logprobs=recompute", "train.mini_batches=2",
        "eval.num_problems=64", "eval.max_new_tokens=64", "checkpoint.every=0", f"output_dir={tmp_path}",
    ])
    summary = run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["weight_sync/buckets"] >= 1 and r["rollout/staleness"] == 0
        print({k: round(v, 3) for k, v in r.items() if k.startswith(("time/", "throughput/", "weight_sync/"))})
    print("rl tokens/s", summary["rl_tokens_per_s"], "samples/s", summary["rl_samples_per_s"])

"""End to end: a few GRPO steps of a micro model through Ray, then the checkpoint in plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from m2flow.config import load_config
from m2flow.rewards import REWARDS, register_reward
from m2flow.runner import run


def has_digit_reward(response: str, ground_truth: str, **_options) -> float:
    """A reward a random micro model earns about half the time, so GRPO groups have a signal."""
    return float(any(c.isdigit() for c in response))


if "e2e_has_digit" not in REWARDS:
    register_reward("e2e_has_digit")(has_digit_reward)

MICRO = [
    "base.hidden_size=32", "base.num_layers=2", "base.num_heads=4", "base.num_kv_heads=2",
    "base.intermediate_size=64", "base.sft_examples=64", "base.sft_steps=4", "base.sft_batch_size=16",
    "data.synthetic_train_size=64", "data.synthetic_eval_size=16", "eval.num_problems=16",
    "eval.max_new_tokens=16", "rollout.max_new_tokens=16", "rollout.n=4", "train.prompts_per_step=4",
    "train.micro_batch_size=8", "train.mini_batches=2", "train.lr=1e-3", "train.steps=3",
    "checkpoint.every=1", "checkpoint.keep_last=1", "cluster.num_cpus=2",
    "reward.name=e2e_has_digit", "cluster.context_switch=true",  # turns: the KV cache freed and re-made every step
    "train.max_tokens_per_microbatch=96", "train.logprob_check_every=1",  # packed; the engine's old logprobs checked
    "train.weight_sync_bucket_mb=0.05",  # the micro model's 106 KiB sent in 3 buckets
]
BENCHMARKS = ["eval.benchmarks=[synthetic_mc]", "eval.k=2", "eval.benchmark_problems=4"]  # m2flow eval's sets too


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = load_config(None, MICRO + BENCHMARKS + [f"output_dir={root / 'runs'}", f"base.cache_dir={root / 'cache'}"])
    return run(cfg, progress=False)


def test_run_writes_config_metrics_summary(summary):
    run_dir = summary["run_dir"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "metrics.png", "log.txt"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    final = load_file(os.path.join(summary["final_checkpoint"], "model.safetensors"))
    model_bytes = sum(t.numel() * t.element_size() for k, t in final.items() if k != "lm_head.weight")
    for r in steps:
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "reward/mean", "time/rollout",
                    "time/update", "response/length_mean"):
            assert torch.isfinite(torch.tensor(r[key])), (key, r[key])
        # the engine and the trainer see the same weights, so their logprobs agree
        assert r["rollout/logprob_abs_diff"] < 1e-4
        # the engine's account: 4 samples per prompt compute it about once; the KV cache is big enough
        assert 0.2 <= r["rollout/prefill_compute_frac"] <= 0.5 and r["rollout/preemptions"] == 0
        assert 1 <= r["rollout/decode_batch_mean"] <= 16 and 1 <= r["rollout/decode_steps"] <= 15
        # weights synced after step k are version k: every step samples with the last step's weights
        assert r["rollout/policy_version"] == r["step"] - 1 and r["rollout/staleness"] == 0
        assert r["weight_sync/buckets"] == 3 and r["weight_sync/gb_per_s"] > 0 and r["time/weight_sync"] > 0
        assert r["weight_sync/gb"] * 2**30 == model_bytes  # every weight once (the tied head is the embedding)
    assert any(0 < r["batch/informative_frac"] for r in steps)
    assert 0.0 <= summary["held_out_accuracy_before"] <= 1.0
    assert summary["held_out_problems"] == 16


def test_weights_changed_and_periodic_checkpoints_pruned(summary):
    base = load_file(os.path.join(summary["base_model"]["path"], "model.safetensors"))
    final = load_file(os.path.join(summary["final_checkpoint"], "model.safetensors"))
    assert base.keys() == final.keys()
    assert any(not torch.equal(base[k], final[k]) for k in base)
    ckpts = sorted(os.listdir(os.path.join(summary["run_dir"], "checkpoints")))
    assert ckpts == ["final", "step_000002"]  # every=1, keep_last=1, the last step is saved as final


def test_checkpoint_loads_in_plain_transformers(summary):
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {summary['final_checkpoint']!r}
model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
prompt = tok.apply_chat_template([{{"role": "user", "content": "Compute 2+3."}}], tokenize=False, add_generation_prompt=True)
ids = tok(prompt, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
assert "m2flow" not in sys.modules
print("GENERATED", out.shape[1] - ids["input_ids"].shape[1])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GENERATED" in proc.stdout
    assert int(proc.stdout.split("GENERATED")[1].split()[0]) >= 1


def test_benchmarks_are_evaluated_before_and_after(summary):
    """eval.benchmarks: m2flow eval's sets with k samples at the evaluation points, their samples kept."""
    run_dir = summary["run_dir"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evaluated = [r["step"] for r in rows if "eval/synthetic_mc/avg@2" in r]
    assert evaluated == [0, 3]
    for r in rows:
        if "eval/synthetic_mc/avg@2" in r:
            assert 0 <= r["eval/synthetic_mc/avg@2"] <= r["eval/synthetic_mc/pass@2"] <= 1
    assert set(summary["benchmarks_after"]["synthetic_mc"]) == {"avg@2", "pass@2", "maj@2"}
    with open(os.path.join(run_dir, "eval", "step_000003", "results.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 4 * 2 and {s["benchmark"] for s in samples} == {"synthetic_mc"}

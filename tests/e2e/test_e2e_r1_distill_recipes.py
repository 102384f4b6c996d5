"""The recipes for RLinf's published models (configs/r1_distill_qwen_{1.5b,7b}_math_grpo.yaml, issue 14): they
hold RLinf's math settings, name their model by Hub id, and run 2 RL steps each on a randomly initialised model
of the same architecture scaled down in layers and width (nothing downloaded; slow-marked: `.venv/bin/pytest -q -m
slow tests/e2e/test_e2e_r1_distill_recipes.py`; 30-45 s per recipe on 2 CPU cores, up to 2 minutes when shared)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_e2e_grpo import has_digit_reward  # noqa: F401 (registers the e2e_has_digit reward)

from m2flow.config import ConfigError, load_config
from m2flow.models.hub import is_hub_id, resolve_model_path
from m2flow.runner import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The published models' config.json (Qwen2ForCausalLM), the keys that set the architecture.
R1_DISTILL_QWEN = {
    "1.5b": dict(hub_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", hidden_size=1536, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                 max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "7b": dict(hub_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", hidden_size=3584, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
}
# RLinf: (response length = seq_length - 1024 prompt tokens, prompts per step, gradient clip)
RLINF = {"1.5b": (18432 - 1024, 512, 0.8), "7b": (28672 - 1024, 256, 1.0)}


def recipe_path(size: str) -> str:
    return os.path.join(ROOT, "configs", f"r1_distill_qwen_{size}_math_grpo.yaml")


@pytest.mark.parametrize("size", sorted(R1_DISTILL_QWEN))
def test_recipe_holds_rlinf_math_settings(size):
    cfg = load_config(recipe_path(size))
    response, prompts, grad_clip = RLINF[size]
    assert cfg.model.path == R1_DISTILL_QWEN[size]["hub_id"] and cfg.model.dtype == "bfloat16"
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (16, 1.0, response)
    assert cfg.cluster.context_switch is not False and cfg.cluster.placement == "collocated"  # (on, on GPUs)
    a = cfg.algorithm
    assert (a.advantage, a.policy_loss, a.loss_agg, a.kl_coef) == ("grpo", "ppo_clip", "token-mean", 0.0)
    assert (a.clip_ratio_low, a.clip_ratio_high) == (0.2, 0.2) and a.norm_adv_by_std
    t = cfg.train
    assert (t.lr, t.warmup_steps, t.weight_decay, t.grad_clip) == (2e-5, 0, 0.05, grad_clip)
    assert (t.prompts_per_step, t.mini_batches, t.epochs) == (prompts, 4, 1)
    assert t.max_tokens_per_microbatch >= 1024 + response  # a full-length sequence fits one micro-batch
    assert cfg.eval.max_new_tokens == response and cfg.eval.benchmarks == ["aime24", "math500"]


def test_model_path_takes_a_hub_id_or_a_local_directory(tmp_path, monkeypatch):
    assert is_hub_id("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    local = tmp_path / "owner" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("owner/name")  # an existing local path always wins
    for not_hub in ("/abs/model", "./model", "a/b/c", "model", ""):
        assert not is_hub_id(not_hub)
    assert resolve_model_path(str(local)) == str(local) and resolve_model_path("") == ""
    with pytest.raises(ConfigError, match="model.path must be an HF model directory .* or a Hugging Face Hub id"):
        load_config(None, ["model.path=./no-such-model"])


def test_unfetchable_hub_id_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """No network (HF_HUB_OFFLINE=1, an empty cache): `m2flow train` names the id and what to do, exits 2."""
    import huggingface_hub.constants

    from m2flow.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: also set where it was read
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    rc = main(["train", "--config", recipe_path("1.5b"), "--no-progress", "eval.benchmarks=[]",
               f"output_dir={tmp_path / 'runs'}", "data.synthetic_train_size=64", "base.sft_examples=64"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("m2flow: model error: model.path 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'"), line
    assert "hf download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in line and "local HF model directory" in line
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # stopped before a run directory was made


def scaled_down(real: dict, vocab_size: int, num_layers: int = 2, head_dim: int = 16) -> dict:
    """The real architecture with fewer layers and a smaller width: one key/value head with the real number of
    query heads per key/value head (the GQA ratio), a narrower head, the real MLP/hidden ratio; the rest
    (positions, RoPE, norm eps, untied LM head) as the real model's."""
    group = real["num_attention_heads"] // real["num_key_value_heads"]
    hidden = group * head_dim
    keep = ("max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")
    return dict({k: real[k] for k in keep}, vocab_size=vocab_size, hidden_size=hidden,
                num_hidden_layers=num_layers, num_attention_heads=group, num_key_value_heads=1,
                intermediate_size=8 * round(hidden * real["intermediate_size"] / real["hidden_size"] / 8))


def build_model_dir(path: str, arch: dict, seed: int = 0) -> None:
    """A randomly initialised Qwen2ForCausalLM of `arch`, saved with the project tokenizer (bfloat16)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from m2flow.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(**arch, use_sliding_window=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)


# Only sizes shrink; the recipe's algorithm, optimizer, dtype, group size and micro-batching stay.
SMALL = ["train.steps=2", "train.prompts_per_step=2", "rollout.max_new_tokens=16", "rollout.engine.max_num_seqs=32",
         "rollout.engine.kv_cache_gb=0.05", "eval.num_problems=4", "eval.max_new_tokens=16", "eval.benchmarks=[]",
         "data.synthetic_train_size=64", "data.synthetic_eval_size=16", "base.sft_examples=64",
         "cluster.num_cpus=2", "reward.name=e2e_has_digit"]  # a reward a random model earns: GRPO has a signal


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for both runs (run() leaves a Ray it did not start running)."""
    from m2flow.config import ClusterConfig
    from m2flow.scheduler.cluster import start_ray, stop_ray

    start_ray(ClusterConfig(num_cpus=2))
    try:
        yield
    finally:
        stop_ray()

@pytest.mark.slow
@pytest.mark.parametrize("size", sorted(R1_DISTILL_QWEN))
def test_recipe_runs_two_steps_on_the_architecture_scaled_down(size, tmp_path, tokenizer, local_ray):
    arch = scaled_down(R1_DISTILL_QWEN[size], len(tokenizer))
    model_dir = str(tmp_path / "model")
    build_model_dir(model_dir, arch)
    cfg = load_config(recipe_path(size), SMALL + [f"model.path={model_dir}", f"output_dir={tmp_path / 'runs'}",
                                                 f"base.cache_dir={tmp_path / 'cache'}"])
    assert (cfg.rollout.n, cfg.model.dtype, cfg.train.mini_batches) == (16, "bfloat16", 4)
    summary = run(cfg, progress=False)

    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        steps = [r for r in (json.loads(line) for line in f) if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("actor/pg_loss", "actor/grad_norm", "reward/mean"):
            assert math.isfinite(r[key]), (key, r)
    assert any(r["actor/grad_norm"] > 0 for r in steps)

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(summary["final_checkpoint"])
    c = final.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        2, arch["hidden_size"], arch["num_attention_heads"], 1)
    assert not c.tie_word_embeddings and c.max_position_embeddings == 131072
    ids = torch.tensor([tokenizer.encode("2+3=")])
    assert torch.isfinite(final(ids).logits).all()

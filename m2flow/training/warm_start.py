"""The default experiment's base model: a tiny Qwen2 warm-started by SFT on a limited set of worked
solutions, built once and cached (keyed by everything that determines it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import torch

from m2flow.config import BaseModelConfig
from m2flow.data.datasets import Problem
from m2flow.data.templates import format_prompt
from m2flow.data.tokenizer import build_tokenizer
from m2flow.eval import evaluate
from m2flow.models.tiny import make_tiny_model, num_parameters, tiny_qwen2_config
from m2flow.rollout import Engine, EngineConfig, SamplingParams
from m2flow.training.checkpoint import save_hf_checkpoint
from m2flow.training.sft import sft_train

log = logging.getLogger(__name__)
INFO_FILE = "base_info.json"


def base_model_key(base: BaseModelConfig, sft: list[Problem], template: str) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(base), sort_keys=True).encode())
    h.update(template.encode())
    for p in sft:
        h.update(f"{p.question}\t{p.solution}\n".encode())
    return h.hexdigest()[:12]


def ensure_base_model(
    base: BaseModelConfig, sft: list[Problem], held_out: list[Problem], template: str = "chat",
    max_new_tokens: int = 48, progress: bool = True,
) -> tuple[str, dict]:
    """Path of the cached base model (built now if missing) and its build info (held-out accuracy during
    SFT, time). `held_out` is used only to measure, never to train."""
    path = os.path.join(base.cache_dir, base_model_key(base, sft, template))
    info_path = os.path.join(path, INFO_FILE)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        log.info("reusing cached base model %s", path)
        return path, {**info, "cached": True}

    start = time.time()
    torch.manual_seed(base.seed)
    tokenizer = build_tokenizer()
    hf_config = tiny_qwen2_config(
        len(tokenizer), hidden_size=base.hidden_size, num_layers=base.num_layers, num_heads=base.num_heads,
        num_kv_heads=base.num_kv_heads, intermediate_size=base.intermediate_size,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = make_tiny_model(hf_config, seed=base.seed)
    prompts = [format_prompt(p.question, tokenizer, template) for p in held_out]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    check_step = max(1, int(base.sft_steps * base.plateau_check_fraction))
    curve: dict[int, float] = {}

    def on_step(step: int, loss: float) -> None:
        if step == check_step or step == base.sft_steps:
            model.eval()
            engine = Engine.from_model(model, tokenizer, EngineConfig(max_num_seqs=max(len(held_out), 1)))
            curve[step] = evaluate(engine.generate, held_out, prompts, greedy).accuracy
            model.train()

    pairs = [(format_prompt(p.question, tokenizer, template), p.solution) for p in sft]
    losses = sft_train(model, tokenizer, pairs, steps=base.sft_steps, batch_size=base.sft_batch_size,
                       lr=base.sft_lr, final_lr_fraction=base.sft_final_lr_fraction, seed=base.seed, on_step=on_step,
                       progress=progress)
    info = {
        "parameters": num_parameters(model),
        "sft_examples": len(sft),
        "sft_steps": base.sft_steps,
        "sft_final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "held_out_accuracy_by_sft_step": {str(k): v for k, v in sorted(curve.items())},
        "build_seconds": time.time() - start,
    }
    save_hf_checkpoint(path + ".build", hf_config, model.state_dict(), tokenizer)
    with open(os.path.join(path + ".build", INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".build", path)  # the cache entry appears complete or not at all
    log.info("built base model %s in %.0fs: %s", path, info["build_seconds"], info)
    return path, {**info, "cached": False}

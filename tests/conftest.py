"""Shared fixtures: the local byte-level tokenizer and a micro Qwen2 model factory (no network)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (the paged decode attention) run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

MICRO = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="session")
def tokenizer():
    from m2flow.data.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def micro_config(tokenizer):
    """A 2-layer, 32-wide Qwen2 config over the byte-level vocab (~30k parameters)."""
    from m2flow.models.tiny import tiny_qwen2_config

    return tiny_qwen2_config(
        len(tokenizer), **MICRO, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


@pytest.fixture(scope="session")
def make_micro_model(micro_config):
    """`make_micro_model(seed=0)`: a fresh, randomly initialised micro model (callers may mutate it)."""
    from m2flow.models.tiny import make_tiny_model

    torch.set_num_threads(1)  # the machine is shared; these models are far too small to need threads

    def make(seed: int = 0):
        return make_tiny_model(micro_config, seed=seed)

    return make


@pytest.fixture(scope="session")
def chat_prompts(tokenizer):
    """`chat_prompts(k, seed=0)`: k chat-templated prompts of synthetic questions (lengths vary)."""
    from m2flow.data.synthetic import make_splits
    from m2flow.data.templates import format_prompt

    def make(k: int, seed: int = 0) -> list[str]:
        problems = make_splits({"p": k}, seed=seed)["p"]
        return [format_prompt(p.question, tokenizer) for p in problems]

    return make

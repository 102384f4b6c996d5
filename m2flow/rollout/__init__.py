"""Rollout: generate responses (token ids, behaviour logprobs, finish reasons) from prompts.

`Engine` is m2flow's own (paged KV cache, continuous batching, shared prefixes); `HFEngine` wraps
transformers `generate` and is the reference the engine is tested against.
"""

from m2flow.rollout.types import GenerateStats, Sample, SamplingParams
from m2flow.rollout.engine import Engine, EngineConfig
from m2flow.rollout.hf_engine import HFEngine

__all__ = ["Sample", "SamplingParams", "GenerateStats", "Engine", "EngineConfig", "HFEngine"]

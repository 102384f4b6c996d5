"""Rollout: generate responses (token ids, behaviour logprobs, finish reasons) from prompts."""

from m2flow.rollout.types import Sample, SamplingParams
from m2flow.rollout.hf_engine import HFEngine

__all__ = ["Sample", "SamplingParams", "HFEngine"]

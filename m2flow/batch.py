"""The tensors that flow between stages of one RL iteration."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from m2flow.rollout.types import Sample


@dataclass
class RolloutBatch:
    """B sequences laid out as [left-padded prompt (P) | right-padded response (T)]."""

    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    response_mask: torch.Tensor  # [B, T] 1 on generated tokens
    rollout_logprobs: torch.Tensor  # [B, T] behaviour logprobs reported by the rollout engine
    group_ids: torch.Tensor  # [B] index of the prompt each sample answers
    scores: Optional[torch.Tensor] = None  # [B] rewards
    advantages: Optional[torch.Tensor] = None  # [B] or [B, T]
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] trainer logprobs before the update
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] reference model logprobs
    values: Optional[torch.Tensor] = None  # [B, T] critic values before the update (algorithm.advantage=gae)
    returns: Optional[torch.Tensor] = None  # [B, T] the critic's regression targets (GAE advantages + values)
    policy_version: Optional[torch.Tensor] = None  # [B] the weight version that generated each sample (long)

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_samples(cls, samples: list[Sample], pad_token_id: int) -> "RolloutBatch":
        P = max(len(s.prompt_ids) for s in samples)
        T = max(max(len(s.token_ids) for s in samples), 1)
        B = len(samples)
        input_ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P + T), dtype=torch.long)
        response_mask = torch.zeros((B, T), dtype=torch.float32)
        rollout_logprobs = torch.zeros((B, T), dtype=torch.float32)
        for i, s in enumerate(samples):
            p, t = len(s.prompt_ids), len(s.token_ids)
            input_ids[i, P - p : P] = torch.tensor(s.prompt_ids)
            input_ids[i, P : P + t] = torch.tensor(s.token_ids, dtype=torch.long)
            attention_mask[i, P - p : P + t] = 1
            response_mask[i, :t] = 1
            rollout_logprobs[i, :t] = torch.tensor(s.logprobs)
        group_ids = torch.tensor([s.prompt_index for s in samples], dtype=torch.long)
        policy_version = torch.tensor([s.policy_version for s in samples], dtype=torch.long)
        return cls(input_ids, attention_mask, response_mask, rollout_logprobs, group_ids,
                   policy_version=policy_version)

    @classmethod
    def concat(cls, batches: list["RolloutBatch"], pad_token_id: int) -> "RolloutBatch":
        """The rows of `batches` stacked in order, re-padded to the widest prompt (left) and response (right).
        A field is kept only if every batch has it. Group ids are kept as they are: give each batch its own."""
        if len(batches) == 1:
            return batches[0]
        P = max(b.prompt_width for b in batches)
        T = max(b.response_mask.shape[1] for b in batches)

        def pad(b: "RolloutBatch", name: str, x: torch.Tensor) -> torch.Tensor:
            if name in ("input_ids", "attention_mask"):
                fill = pad_token_id if name == "input_ids" else 0
                p, t = b.prompt_width, b.response_mask.shape[1]
                return torch.nn.functional.pad(x, (P - p, T - t), value=fill)
            if x.dim() == 2:  # [B, T] token tensors: right padding
                return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=0)
            return x

        out = {}
        for f in fields(cls):
            parts = [getattr(b, f.name) for b in batches]
            out[f.name] = None if any(x is None for x in parts) else torch.cat(
                [pad(b, f.name, x) for b, x in zip(batches, parts)])
        return cls(**out)

    def select(self, index: torch.Tensor | slice) -> "RolloutBatch":
        """The rows `index` of every tensor field."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: (v[index] if v is not None else None) for k, v in values.items()})

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """Every tensor field on `device` (the same tensors where they are there already)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: (v.to(device) if v is not None else None) for k, v in values.items()})

    def split(self, size: int) -> list["RolloutBatch"]:
        """Consecutive micro-batches of at most `size` sequences."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

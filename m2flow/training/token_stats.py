"""Memory-lean logprobs and entropy (train.logits_chunk_tokens): the LM head's [tokens, vocab] float32 logits
are never held whole.

`LeanLMHead` takes the place of a causal LM's `lm_head` (the same weight Parameter, so tied embeddings and
FSDP2 sharding are unchanged, and without a request it returns ordinary logits). When `token_stats` asks
for the statistics of given target tokens, it returns per position [logprob of the target under
logits / temperature, entropy of softmax(logits)] computed `chunk` positions at a time, each chunk under
activation checkpointing: the chunk's logits are recomputed in the backward pass, so forward and backward
hold at most one chunk of logits (about chunk x vocab x 4 bytes, a few times over) however many tokens the
micro-batch has (logits no larger than chunk x 32,768 elements are computed in one pass, without the
recomputation: a small vocabulary does not pay for chunking). With a 150k vocabulary, 4,096 response tokens of full logits are 2.5 GB in float32 before
log_softmax and the gradient double it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


SMALL_VOCAB = 32768  # logits of at most chunk x this many elements (128 MiB at the default chunk) are computed at once


def _stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """[c, 2]: logprob of `targets` under logits / temperature (0 and 1 = raw logits) and entropy of the raw
    logits, for hidden states [c, H]."""
    logits = F.linear(hidden, weight, bias).float()
    lse = logits.logsumexp(-1)
    entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    if temperature not in (0, 1):
        scaled = logits / temperature
        logprob = scaled.gather(-1, targets[:, None]).squeeze(-1) - scaled.logsumexp(-1)
    else:
        logprob = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    return torch.stack([logprob, entropy], dim=-1)


class LeanLMHead(torch.nn.Module):
    def __init__(self, head: torch.nn.Linear, chunk: int, one_pass_elements: int | None = None):
        super().__init__()
        self.weight = head.weight  # the same Parameter: ties and sharding are kept
        self.bias = head.bias
        self.in_features, self.out_features = head.in_features, head.out_features
        self.chunk = chunk
        # logits up to this many elements are computed in one pass (no chunks, no recomputation)
        self.one_pass_elements = chunk * SMALL_VOCAB if one_pass_elements is None else one_pass_elements
        self.request: tuple[torch.Tensor, float] | None = None  # (targets, temperature) for the next call

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.request is None:
            return F.linear(hidden, self.weight, self.bias)
        targets, temperature = self.request
        self.request = None
        flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
        if flat.shape[0] != flat_targets.shape[0]:
            raise ValueError(f"{flat.shape[0]} positions but {flat_targets.shape[0]} target tokens")
        if flat.shape[0] * self.out_features <= self.one_pass_elements:  # small logits: one pass, no recompute
            return _stats(flat, self.weight, self.bias, flat_targets, temperature).reshape(*hidden.shape[:-1], 2)
        parts = []
        for i in range(0, flat.shape[0], self.chunk):
            args = (flat[i: i + self.chunk], self.weight, self.bias, flat_targets[i: i + self.chunk], temperature)
            parts.append(checkpoint(_stats, *args, use_reentrant=False) if torch.is_grad_enabled() else _stats(*args))
        return torch.cat(parts).reshape(*hidden.shape[:-1], 2).clone()  # not a view: FSDP2 hooks the model's output


def use_lean_head(model, chunk: int, one_pass_elements: int | None = None) -> None:
    """Puts a LeanLMHead of `chunk` positions in place of `model.lm_head` (before FSDP wrapping)."""
    if not isinstance(model.lm_head, LeanLMHead):
        model.lm_head = LeanLMHead(model.lm_head, chunk, one_pass_elements)


def lean_head(model) -> LeanLMHead | None:
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, LeanLMHead) else None

"""The reference policy of the KL term (algorithm.kl_coef > 0): the frozen starting weights, no optimizer.

It runs on a group of train.ranks ranks like the actor (its own process group). On N > 1 ranks FSDP2 shards it
over them, so a rank holds 1/N of the weights and each layer is gathered for its forward and freed after it; each
rank computes the logprobs of its token-balanced share of the rows and the shares are summed
(forward.batch_logprobs), so every rank returns the whole batch's logprobs, those of one rank. On one rank there
is nothing to shard and the plain module runs (no collectives)."""

from __future__ import annotations

import torch

from m2flow.batch import RolloutBatch
from m2flow.config import TrainConfig
from m2flow.training.actor import apply_fsdp
from m2flow.training.data_parallel import world
from m2flow.training.forward import batch_logprobs
from m2flow.training.packing import use_varlen_attention
from m2flow.training.token_stats import use_lean_head


class Reference:
    def __init__(self, model: torch.nn.Module, train: TrainConfig, temperature: float = 1.0):
        """`model`: the starting policy (frozen here); micro-batching, packing and the lean head as the actor's
        (`train`); `temperature`: the rollout's (token_logprobs treats 0, greedy, as 1)."""
        self.train_cfg, self.temperature = train, temperature
        model = model.eval().requires_grad_(False)
        if train.max_tokens_per_microbatch > 0:
            use_varlen_attention(model)
        if train.logits_chunk_tokens > 0:
            use_lean_head(model, train.logits_chunk_tokens)
        self.model = apply_fsdp(model) if train.fsdp and world()[1] > 1 else model

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """Logprobs of the response tokens under the reference weights, 0 off the response mask: [B, T] (a
        collective on N ranks: every rank calls it with the same batch)."""
        t = self.train_cfg
        return batch_logprobs(self.model, batch, self.temperature, t.micro_batch_size, t.max_tokens_per_microbatch,
                              t.share_prompts)

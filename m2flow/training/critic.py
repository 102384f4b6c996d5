"""The critic of PPO (algorithm.advantage=gae): the policy's transformer with a scalar value head, sharded
with FSDP2 and trained like the actor (same mini-batches, epochs, micro-batches) on the clipped value loss. It
runs on a group of train.ranks ranks of its own (its own process group), data parallel by tokens like the actor
(training/data_parallel.py)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from m2flow.algorithms import value_loss
from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, CriticConfig, TrainConfig
from m2flow.training.actor import (apply_fsdp, device_of, full_state_dict, make_optimizer, optimize,
                                   use_activation_checkpointing)
from m2flow.training.data_parallel import rank_micro_batches, world
from m2flow.training.packing import micro_batches
from m2flow.training.forward import response_logits


def load_value_model(path: str, dtype: str = "float32"):
    """An HF causal-LM checkpoint as a value model: `AutoModelForTokenClassification` with one label (the
    checkpoint's transformer body, its LM head dropped, a new linear `score` head), no dropout. The head
    starts at zero, so every value starts at exactly 0 and the first advantages are plain returns."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"not an HF model directory (no config.json): {path}")
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.classifier_dropout = 0.0  # values must be deterministic in training mode too
    model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=getattr(torch, dtype))
    zero_value_head(model)
    return model


def zero_value_head(model) -> None:
    head = model.score
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()


def response_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """V(s_t) for the last `response_len` tokens: the value head at the position that predicts token t (the
    state before the token is chosen), [B, T] float32. The value model's one-label "logits" are the values."""
    return response_logits(model, input_ids, attention_mask, response_len)[..., 0]


class Critic:
    def __init__(self, model, train: TrainConfig, critic: CriticConfig, algorithm: AlgorithmConfig,
                 param_dtype: torch.dtype | None = None):
        """`model` on the device it trains on; `param_dtype`: compute in this dtype over float32 master weights
        (FSDP2 mixed precision, on GPU), as the actor."""
        self.train_cfg, self.critic_cfg, self.algo = train, critic, algorithm
        if train.activation_checkpointing:
            use_activation_checkpointing(model)
        self.device = device_of(model)  # where it computes (with train.offload its shards then move to the host)
        self.model = apply_fsdp(model, param_dtype, train.offload) if train.fsdp else model
        self.optimizer, self.lr_schedule = make_optimizer(self.model, critic.lr, critic.weight_decay,
                                                        critic.warmup_steps)
        self.bad_steps_in_a_row = 0  # optimizer steps skipped for a non-finite loss or gradient norm (see training/actor.step)

    def _micro_batches(self, mini: RolloutBatch) -> list[tuple[torch.Tensor, RolloutBatch]]:
        return micro_batches(mini, self.train_cfg.micro_batch_size)  # padded rows (the value head is not packed)

    def _values(self, mb: RolloutBatch) -> torch.Tensor:
        """`mb` on the model's device: its values there, float32."""
        return response_values(self.model, mb.input_ids, mb.attention_mask, mb.response_mask.shape[1]).float()

    @torch.no_grad()
    def compute_values(self, batch: RolloutBatch) -> torch.Tensor:
        """Values of the response tokens under the current weights, 0 off the response mask: [B, T]. On N ranks
        (a collective: every rank calls it with the same batch) each computes its token-balanced share of the
        rows, as the update splits them, and the shares are summed: every rank returns all the values."""
        self.model.eval()
        rank, size = world()
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)  # on the host, where the batch is
        for rows, mb, real in rank_micro_batches(batch, self._micro_batches, rank, size):
            values = self._values(mb.to(self.device))
            if real:  # (a dummy pass only keeps FSDP2's collectives paired across ranks)
                out[rows] = values.to(out.device)
        if size > 1:
            dist.all_reduce(out)  # every row was computed by exactly one rank
        return out * batch.response_mask

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Regresses the values on `batch.returns` with `value_loss` (clipped around `batch.values`, the
        values at rollout time, by algorithm.value_clip), in the actor's mini-batch / epoch schedule."""
        if batch.returns is None or batch.values is None:
            raise ValueError("critic update needs batch.values (compute_values) and batch.returns (GAE)")
        return optimize(self, batch, self.train_cfg, self.critic_cfg.grad_clip, "critic")

    def _weight(self, rows: RolloutBatch) -> float:
        """Token-mean value loss: rows weigh their valid tokens (see training/actor.py accumulate)."""
        return float(rows.response_mask.sum())

    def _micro_batch_loss(self, mb: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mb = mb.to(self.device)
        values = self._values(mb)
        loss, metrics = value_loss(values, mb.values, mb.returns, mb.response_mask,
                                   clip_range_value=self.algo.value_clip, loss_agg="token-mean")
        metrics["value_loss"] = float(loss.detach())
        return loss, metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)

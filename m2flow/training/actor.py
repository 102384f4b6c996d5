"""The trainer: holds the policy (FSDP2-sharded over the trainer's process group), computes logprobs and
applies the policy-gradient update. A thin shell over pure functions from `m2flow.algorithms`."""

from __future__ import annotations

import atexit
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from m2flow.algorithms import KL_ESTIMATORS, POLICY_LOSSES, broadcast_to_tokens, entropy_from_logits, masked_mean
from m2flow.algorithms.losses import ADVANTAGE_LINEAR_LOSSES
from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, TrainConfig
from m2flow.training.data_parallel import all_ranks, all_reduce_sum, rank_micro_batches, world
from m2flow.training.forward import batch_logprobs, response_logits, response_token_stats, token_logprobs
from m2flow.training.packing import micro_batches, use_varlen_attention
from m2flow.training.token_stats import use_lean_head
from m2flow.training.weight_sync import MB, buckets, full_weights


def init_single_process_group(device_type: str = "cpu") -> None:
    """A one-rank process group, so FSDP2 runs the same code path as on many ranks. Its rendezvous is a file
    store: a TCP store's server would listen on all network interfaces (issue 12)."""
    if dist.is_initialized():
        return
    fd, path = tempfile.mkstemp(prefix="m2flow-pg-")
    os.close(fd)
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    init_trainer_group(0, 1, path, device_type)


def init_trainer_group(rank: int, world_size: int, store_path: str, device_type: str = "cpu") -> None:
    """The trainer's process group of `world_size` ranks, meeting through the file `store_path` (every rank gives
    the same path; the file must not exist yet or be empty): gloo on CPU; on GPUs NCCL for CUDA tensors (FSDP2's
    collectives) and gloo for CPU ones (metrics, gathered logprobs)."""
    backend = "gloo" if device_type == "cpu" else "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device `model` computes on (that of its first parameter, a DTensor's local one when sharded)."""
    return next(model.parameters()).device


def apply_fsdp(model: torch.nn.Module, param_dtype: torch.dtype | None = None, offload: bool = False) -> torch.nn.Module:
    """FSDP2: shard each decoder layer, then the root (torchtitan style), on the model's device type. With
    `param_dtype` (bfloat16 on GPU): the sharded parameters stay in their own dtype (float32 master weights, as the
    optimizer sees them) and each layer computes in `param_dtype`, its gradients reduced in float32
    (MixedPrecisionPolicy). With `offload`: the shards, their gradients and so the optimizer state live in host
    memory (CPUOffloadPolicy; pinned when the model is on a GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device_type = device_of(model).type
    init_single_process_group(device_type)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    # one rank holds every parameter whole anyway: freeing them after forward only adds an all-gather (a copy)
    options = {"mesh": mesh, "reshard_after_forward": dist.get_world_size() > 1}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def use_activation_checkpointing(model: torch.nn.Module) -> None:
    """Each decoder layer keeps only its input for backward and recomputes its activations there
    (transformers' per-layer checkpointing, non-reentrant, so it composes with FSDP2's per-layer sharding)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU, keyed by the HF parameter names."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in sd.items()}  # one rank: the gathered tensors can alias the parameters
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int):
    """AdamW and a linear-warmup-then-constant learning-rate schedule (the actor's and the critic's)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    warmup = max(warmup_steps, 0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, lr_schedule


@dataclass
class Gradients:
    """What micro-batches accumulated towards one optimizer step (see `accumulate`): the gradients themselves are
    in the parameters' .grad, summed over micro-batches, each weighed by its loss weight (tokens or sequences)."""

    weight: float = 0.0  # the loss weight of every row given, trained or skipped (the loss's normaliser)
    trained: float = 0.0  # of the rows this rank trained on (the metrics' normaliser)
    sums: dict = field(default_factory=dict)  # metric -> sum of value x weight over this rank's micro-batches
    finite: bool = True  # every loss so far was finite


def accumulate(trainer, rows: RolloutBatch, grads: Gradients) -> None:
    """Adds the gradients of `rows` (given whole to every rank; each computes its share of the micro-batches) to
    the parameters' .grad and their weight and metrics to `grads`. A micro-batch's token-mean (or sequence-mean)
    loss is multiplied by its weight, so a sum over micro-batches in any order and grouping, divided by the total
    weight in `step`, is the loss of all rows together: streamed micro-batches and a whole mini-batch give the
    same update. `trainer` has `model`, `_micro_batches(rows)`, `_micro_batch_loss(mb) -> (loss, metrics)` and
    `_weight(rows)`."""
    trainer.model.train()
    rank, size = world()  # data parallel over the trainer's ranks (training/data_parallel.py)
    grads.weight += trainer._weight(rows)  # of every row, also those _micro_batches skips (advantage 0)
    for _, mb, real in rank_micro_batches(rows, trainer._micro_batches, rank, size):
        loss, metrics = trainer._micro_batch_loss(mb)
        if not real:  # a pass that keeps FSDP2's collectives paired across ranks; no gradient
            (loss.nan_to_num(0.0) * 0.0).backward()
            for k in metrics:  # the same metric keys on every rank, for the all-reduce
                grads.sums.setdefault(k, 0.0)
            continue
        weight = trainer._weight(mb)
        grads.finite &= bool(torch.isfinite(loss.detach()))
        (loss * weight * size).backward()  # FSDP2 averages gradients over the ranks
        grads.trained += weight
        for k, v in metrics.items():
            grads.sums[k] = grads.sums.get(k, 0.0) + v * weight


def step(trainer, grads: Gradients, grad_clip: float) -> dict[str, float]:
    """One optimizer step from what `accumulate` gathered: the summed gradients divided by the rows' total weight,
    clipped to `grad_clip`, applied (the .grad stay until the next accumulation starts). A step whose loss or gradient norm is not finite is skipped (no
    weight or schedule change) and counted in `trainer.bad_steps_in_a_row` (reset by a good step). Returns the
    step's metrics, averaged over the trained rows' weight, plus grad_norm and skipped (0 or 1)."""
    sums = all_reduce_sum({**grads.sums, "_trained": grads.trained})
    trained = sums.pop("_trained") or 1.0  # 0 when the rows hold no loss token at all
    if grads.weight > 0:
        for p in trainer.model.parameters():
            if p.grad is not None:
                p.grad.div_(grads.weight)
    finite = all_ranks(grads.finite)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    skipped = not (finite and bool(torch.isfinite(grad_norm)))
    if not skipped:
        trainer.optimizer.step()
        trainer.lr_schedule.step()
        trainer.bad_steps_in_a_row = 0
    else:  # the weights stay those of the last good step
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.bad_steps_in_a_row += 1
    return {**{k: v / trained for k, v in sums.items()}, "grad_norm": float(grad_norm), "skipped_steps": float(skipped)}


def step_metrics(steps: list[dict[str, float]], trainer, prefix: str) -> dict[str, float]:
    """The metrics of an update of one or more optimizer steps: averaged over the steps (skipped_steps summed),
    as `<prefix>/<name>`, plus `<prefix>/lr` and `<prefix>/bad_steps_in_a_row` (which the runner compares with
    train.max_bad_steps)."""
    out = {f"{prefix}/{k}": sum(s.get(k, 0.0) for s in steps) / max(len(steps), 1) for k in steps[0]} if steps else {}
    out[f"{prefix}/skipped_steps"] = sum(s["skipped_steps"] for s in steps)
    out[f"{prefix}/lr"] = trainer.lr_schedule.get_last_lr()[0]
    out[f"{prefix}/bad_steps_in_a_row"] = float(trainer.bad_steps_in_a_row)
    return out


def optimize(trainer, batch: RolloutBatch, cfg: TrainConfig, grad_clip: float, prefix: str) -> dict[str, float]:
    """The update loop shared by the actor and the critic: `cfg.epochs` passes over `batch` in a seeded random
    order, `cfg.mini_batches` optimizer steps per pass, each accumulated over micro-batches of
    `cfg.micro_batch_size` (`accumulate`, then `step`). Returns the metrics averaged over optimizer steps (see
    `step_metrics`)."""
    steps = []
    generator = torch.Generator().manual_seed(int(batch.group_ids.sum()))
    for _ in range(cfg.epochs):
        order = torch.randperm(len(batch), generator=generator)
        for mini in batch.select(order).split(-(-len(batch) // cfg.mini_batches)):
            trainer.optimizer.zero_grad(set_to_none=True)
            grads = Gradients()
            accumulate(trainer, mini, grads)
            steps.append(step(trainer, grads, grad_clip))
    return step_metrics(steps, trainer, prefix)


class Actor:
    def __init__(self, model, train: TrainConfig, algorithm: AlgorithmConfig, temperature: float = 1.0,
                 param_dtype: torch.dtype | None = None):
        """`model` on the device it trains on; `param_dtype`: compute in this dtype over float32 master weights
        (FSDP2 mixed precision, on GPU)."""
        self.train_cfg, self.algo = train, algorithm
        self.temperature = temperature  # token_logprobs treats 0 (greedy) as 1
        self.hf_config = model.config
        self.packed = train.max_tokens_per_microbatch > 0
        if self.packed:
            use_varlen_attention(model)
        self.lean = train.logits_chunk_tokens > 0
        if self.lean:
            use_lean_head(model, train.logits_chunk_tokens)
        if train.activation_checkpointing:
            use_activation_checkpointing(model)
        self.device = device_of(model)  # where it computes (with train.offload its shards then move to the host)
        self.model = apply_fsdp(model, param_dtype, train.offload) if train.fsdp else model
        self.optimizer, self.lr_schedule = make_optimizer(self.model, train.lr, train.weight_decay, train.warmup_steps)
        self.bad_steps_in_a_row = 0  # optimizer steps skipped for a non-finite loss or gradient norm (see step)
        self.pending: Gradients | None = None  # the streamed update's gradients so far (accumulate)
        self.streamed_steps: list[dict[str, float]] = []  # the streamed update's optimizer steps' metrics
        self.policy_loss = POLICY_LOSSES.get(algorithm.policy_loss)
        # the KL loss term; with algorithm.kl_in_reward the runner puts the KL into the rewards instead
        use_kl_loss = algorithm.kl_coef > 0 and not algorithm.kl_in_reward
        self.kl = KL_ESTIMATORS.get(algorithm.kl_estimator) if use_kl_loss else None
        # dual-clip and truncated importance sampling, passed only when on (a user's loss need not take them)
        self.loss_options = {k: v for k, v in (("clip_ratio_c", algorithm.clip_ratio_c), ("tis_cap", algorithm.tis_cap))
                             if v is not None}
        # a sequence whose advantage is 0 everywhere adds nothing to the loss or its gradient when the loss is
        # only the policy term of a built-in surrogate: the update skips it (its tokens still count in the
        # loss's normaliser through _share, so the gradient is exactly the same)
        self.skip_zero_advantage = (algorithm.policy_loss in ADVANTAGE_LINEAR_LOSSES and self.kl is None
                                    and algorithm.entropy_coef == 0)

    def _logits(self, mb: RolloutBatch) -> torch.Tensor:
        return response_logits(self.model, mb.input_ids, mb.attention_mask, mb.response_mask.shape[1], self.packed,
                               self.train_cfg.share_prompts)

    def _micro_batches(self, mini: RolloutBatch) -> list[tuple[torch.Tensor, RolloutBatch]]:
        t = self.train_cfg
        rows = torch.arange(len(mini))
        if self.skip_zero_advantage:
            active = (broadcast_to_tokens(mini.advantages, mini.response_mask) != 0).any(1)
            if active.any():  # (with none active, all run: the metrics stay defined)
                rows = rows[active]
                mini = mini.select(rows)
        return [(rows[r], mb) for r, mb in micro_batches(mini, t.micro_batch_size, t.max_tokens_per_microbatch,
                                                          t.share_prompts)]

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """Logprobs of the response tokens under the current weights: [B, T]."""
        self.model.eval()
        return batch_logprobs(self.model, batch, self.temperature, self.train_cfg.micro_batch_size,
                              self.train_cfg.max_tokens_per_microbatch, self.train_cfg.share_prompts)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """`epochs` passes over the batch in `mini_batches` optimizer steps, each accumulated over
        micro-batches; every micro-batch's loss is weighted by its share of the mini-batch's tokens."""
        return optimize(self, batch, self.train_cfg, self.train_cfg.grad_clip, "actor")

    def accumulate(self, rows: RolloutBatch) -> None:
        """The streamed update, as micro-batches arrive: adds the gradients of `rows` (every rank is given all of
        them) towards the next `optimizer_step`. The rows need advantages and old logprobs; any order and grouping
        of a mini-batch's rows gives the update `update` would (up to float rounding)."""
        if self.pending is None:  # the first rows towards a step
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = Gradients()
        accumulate(self, rows, self.pending)

    def optimizer_step(self) -> dict[str, float]:
        """Steps on what `accumulate` gathered since the last step; the step's metrics (see training/actor.step)."""
        metrics = step(self, self.pending or Gradients(), self.train_cfg.grad_clip)
        self.pending = None
        self.streamed_steps.append(metrics)
        return metrics

    def streamed_update_metrics(self) -> dict[str, float]:
        """The metrics of the optimizer steps since the last call, as `update` returns them."""
        out, self.streamed_steps = step_metrics(self.streamed_steps, self, "actor"), []
        return out

    def _weight(self, rows: RolloutBatch) -> float:
        """The rows' weight in the loss of any larger batch holding them, which `accumulate` sums over
        micro-batches: their valid tokens (token-mean) or non-empty sequences."""
        if self.algo.loss_agg == "token-mean":
            return float(rows.response_mask.sum())
        return float((rows.response_mask.sum(1) > 0).sum())

    def _micro_batch_loss(self, mb: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        algo, mb = self.algo, mb.to(self.device)
        if self.lean:  # logprobs and entropy chunk by chunk of tokens, never all the logits
            logprobs, entropy = response_token_stats(self.model, mb.input_ids, mb.attention_mask,
                                                     mb.response_mask.shape[1], self.temperature, self.packed,
                                                     self.train_cfg.share_prompts)
        else:
            logits = self._logits(mb)
            logprobs = token_logprobs(logits, mb.input_ids[:, mb.prompt_width :], self.temperature)
            entropy = entropy_from_logits(logits.detach() if algo.entropy_coef == 0 else logits)
        if algo.entropy_coef == 0:
            entropy = entropy.detach()
        mask = mb.response_mask
        advantages = broadcast_to_tokens(mb.advantages, mask)
        options = dict(self.loss_options)
        if "tis_cap" in options:
            options["rollout_logprobs"] = mb.rollout_logprobs
        loss, metrics = self.policy_loss(
            logprobs, mb.old_logprobs, advantages, mask,
            clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high, loss_agg=algo.loss_agg,
            **options,
        )
        entropy_mean = masked_mean(entropy, mask)
        metrics = {f"pg_{k}" if not k.startswith("pg") else k: v for k, v in metrics.items()}
        metrics["pg_loss"] = float(loss.detach())
        metrics["entropy"] = float(entropy_mean.detach())
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * entropy_mean
        if self.kl is not None:
            kl = masked_mean(self.kl(logprobs, mb.ref_logprobs), mask)
            loss = loss + algo.kl_coef * kl
            metrics["kl"] = float(kl.detach())
        return loss, metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)

    def weight_buckets(self, bucket_mb: float) -> Iterator[dict[str, torch.Tensor]]:
        """The full weights as buckets of at most `bucket_mb` MiB (training/weight_sync.py), gathered weight by
        weight as the buckets are consumed: with several ranks every rank must consume them all, in step."""
        return buckets(full_weights(self.model), int(bucket_mb * MB))

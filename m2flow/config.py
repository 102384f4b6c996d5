"""Experiment configuration: dataclasses used as OmegaConf structured configs.

Every option has a default, a type and a one-line doc (the comment after it). A YAML file in `configs/`
overrides the defaults, and `key=value` pairs on the command line override the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # Ray cluster address ("auto", "ray://host:10001"); None starts Ray locally
    num_cpus: Optional[int] = None  # CPUs for a locally started Ray; None = all of this machine's
    placement: Any = "collocated"  # which devices each role runs on: collocated (every role on every device, stages in turn), disaggregated (the rollout on the first half of the devices, the rest on the others; rollout groups stream to the trainer as they finish), or a spec in RLinf's syntax over the roles rollout, reward, inference, actor, critic, e.g. {rollout: "0", actor: "1"} or {"rollout,inference": "0-1", actor: "2-3"} (hybrid); see docs/placement.md
    device: str = "auto"  # auto | cpu | cuda: the devices worker groups are placed on; auto = cuda when the Ray cluster has GPUs (each rank sees one GPU; groups share them, collocated)
    devices: int = 0  # how many devices the run uses: GPUs (0 = all of the cluster's), or on CPU sets of cores (each node's usable cores split evenly; each rank is pinned to its device's cores, threads = its cores; 0 = one device per node)
    context_switch: Optional[bool] = None  # the rollout and the training groups (actor, reference, critic), where they share devices (collocated; the shared part of a hybrid), take turns on them: each phase takes the devices' lock, onloads what it needs (the engine its weights and a KV cache; a trainer its parameters and, to update, its optimizer state), runs, and offloads to host memory after (gradients and the KV cache freed); false = every group keeps its state on the device (faster where it all fits) and groups sharing devices may run at once; null = true on GPU devices, false on CPU devices (where host and device memory are one: nothing moves, and freeing and re-making the KV cache only costs time). Training groups sharing devices only among themselves always stay resident together
    device_memory_gb: Optional[float] = None  # each device's memory budget for the ledger of what the ranks keep on it (after every onload and offload): a phase that brings a device over it fails, naming what each rank keeps there; null = no budget on CPU, the GPU's memory on cuda
    listen_all: bool = False  # a locally started Ray listens on all network interfaces (warns: no authentication, anyone reaching its ports can run code); false = 127.0.0.1 only


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory to start from, or a Hugging Face Hub id (owner/name, not a local path: fetched into the HF cache at start-up); empty = the warm-started tiny base (see `base`)
    dtype: str = "float32"  # parameter dtype for training and rollout: float32 | bfloat16


@dataclass
class BaseModelConfig:
    """How the default experiment makes its own base model: a tiny Qwen2 + supervised warm start."""

    cache_dir: str = ".cache/m2flow/base"  # where the built base model is cached and reused
    hidden_size: int = 128  # transformer width
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    intermediate_size: int = 384  # SwiGLU hidden size
    sft_examples: int = 12000  # demonstrations for the supervised warm start
    sft_direct_fraction: float = 0.28  # share of demonstrations that give only the final answer, no worked steps
    sft_steps: int = 4000  # optimizer steps of supervised warm start
    sft_batch_size: int = 16  # sequences per supervised step
    sft_lr: float = 3e-3  # peak learning rate of supervised warm start (cosine decay)
    sft_final_lr_fraction: float = 0.0  # the cosine decay ends at this fraction of sft_lr (0 = decays to zero: the base ends near a plateau)
    plateau_check_fraction: float = 0.75  # also evaluate the base at this fraction of sft_steps (plateau evidence)
    seed: Optional[int] = None  # seed of the base model's init and SFT order; null = the run's `seed`


@dataclass
class DataConfig:
    train_path: str = ""  # jsonl/parquet of RL prompts; empty = synthetic math problems
    eval_path: str = ""  # jsonl/parquet of held-out problems; empty = synthetic held-out split
    prompt_key: str = "question"  # field holding the problem text
    answer_key: str = "answer"  # field holding the ground-truth final answer
    template: str = "chat"  # prompt template: chat (tokenizer's chat template) | plain (question as is)
    synthetic_train_size: int = 10000  # synthetic RL problems (answers only, no worked solutions)
    synthetic_eval_size: int = 500  # synthetic held-out problems, disjoint from every training split
    synthetic_seed: int = 7  # seed of the synthetic problem generator
    synthetic_max_operand: int = 9  # synthetic problems draw +/- operands from 1..this
    synthetic_max_multiplier: int = 9  # synthetic problems multiply by 2..this
    bad_rows: str = "error"  # rows with no/empty question or answer or invalid JSON, and prompts whose tokens + max_new_tokens exceed the model's max_position_embeddings: error (stop at start-up naming file:line) | skip (drop them; counted in summary.json and metrics as data/*_skipped)


KERNELS = ("auto", "triton", "torch")  # EngineConfig.kernels values


@dataclass
class EngineConfig:
    """m2flow's engine: its batch and KV cache budgets and which kernels it runs (a run's `rollout.engine`)."""

    max_num_seqs: int = 512  # sequences decoded together (the most sequences in one decode step)
    max_num_batched_tokens: int = 16384  # prompt tokens computed in one prefill step
    max_model_len: int = 0  # prompt + response cap; 0 = the model's max_position_embeddings
    block_size: int = 16  # tokens per KV cache block
    kv_cache_gb: float = 0.0  # KV cache budget in GiB; 0 = auto (kv_cache_fraction of free GPU memory, 1 GiB on CPU)
    kv_cache_fraction: float = 0.3  # share of free GPU memory for the KV cache when kv_cache_gb is 0
    prefix_caching: bool = True  # share KV blocks between sequences with the same prefix: a prompt's n samples compute it once
    cuda_graphs: bool = True  # on a GPU, replay decode steps as CUDA graphs captured per batch-size bucket (false: eager, for debugging)
    kernels: str = "auto"  # triton (decode attention by the paged kernel, blocks read in place; fused sampling) | torch (blocks gathered, then matmuls) | auto (triton on a GPU, torch on CPU, where Triton only runs in its slow interpreter)
    compile: bool = False  # torch.compile the eager decode step (kernels=torch without CUDA graphs: CPU, or a GPU with both off): on CPU 2-4x faster steps after ~30 s of compilation (~5 s with inductor's disk cache warm); pays for long runs

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels (rollout.engine.kernels) must be one of {', '.join(KERNELS)}, got {self.kernels!r}")


@dataclass
class RolloutConfig:
    backend: str = "m2flow"  # generation engine: m2flow (paged KV cache, continuous batching) | hf (transformers generate, the reference)
    n: int = 8  # samples per prompt (the GRPO group)
    replicas: int = 1  # engine replicas (data-parallel, m2flow backend): prompts split into contiguous shares of about equal expected work (tokens), samples identical for any count
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling threshold (1.0 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 48  # response length cap
    engine: EngineConfig = field(default_factory=EngineConfig)  # m2flow's engine (the hf backend takes engine.max_num_seqs as its batch size)


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"  # advantage estimator: grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline (registry names) or gae (PPO with a critic)
    norm_adv_by_std: bool = True  # GRPO: divide by the group's reward std
    policy_loss: str = "ppo_clip"  # policy loss (registry name)
    clip_ratio_low: float = 0.2  # PPO clip: lower bound is 1 - clip_ratio_low
    clip_ratio_high: float = 0.2  # PPO clip: upper bound is 1 + clip_ratio_high
    loss_agg: str = "token-mean"  # loss aggregation (registry name)
    kl_coef: float = 0.0  # weight of KL(actor || reference) in the loss (or the reward, see kl_in_reward); 0 = no reference model
    kl_estimator: str = "k3"  # KL estimator (registry name)
    entropy_coef: float = 0.0  # entropy bonus weight
    filter_groups: bool = True  # drop groups whose rewards are all equal (zero advantage) before the update
    clip_ratio_c: Optional[float] = None  # PPO dual-clip: cap the loss of negative-advantage tokens at -A * c (> 1, e.g. 3.0); null = off; not with gspo
    tis_cap: Optional[float] = None  # truncated importance sampling: weight each token by min(exp(trainer - rollout engine logprobs), tis_cap) (e.g. 2.0); null = off
    kl_in_reward: bool = False  # apply kl_coef * KL (kl_estimator) as a per-token reward penalty instead of a loss term (reinforce_pp, reinforce_pp_baseline, gae)
    gamma: float = 1.0  # discount of per-token rewards (reinforce_pp returns, GAE)
    lam: float = 1.0  # GAE lambda (bias/variance trade-off of the critic's advantages)
    whiten_advantages: bool = False  # whiten the estimator's advantages over all valid tokens of the batch
    value_clip: Optional[float] = None  # critic (gae): clip values to within this of their rollout-time values in the value loss; null = off
    overlong_filter: bool = False  # mask truncated responses (finish reason "length") out of the loss
    dynamic_sampling_max_tries: int = 1  # with filter_groups: generation rounds per step to fill train.prompts_per_step informative groups (DAPO dynamic sampling); 1 = no resampling
    max_staleness: int = 0  # 0 = on-policy; 1 = one-step off-policy: step k+1's rollout is generated while step k trains, by the weights of step k-1 (needs a pipelined placement: disaggregated or hybrid); samples carry their policy version, rollout/staleness logs it, and the PPO ratio is taken against the engine's logprobs of the policy that sampled them


@dataclass
class RewardConfig:
    name: str = "math"  # reward function (registry name)
    format_penalty: float = 0.0  # reward for a response with no extractable answer is -format_penalty
    timeout_s: float = 2.0  # per-response scoring time limit (extraction and verification; hard: a stuck scorer process is killed); a response past it scores -format_penalty and counts in reward/timeouts
    workers: int = 2  # processes that score responses (training and evaluation) under the time limit
    overlong_buffer: int = 0  # DAPO soft overlong punishment: penalty ramps up over the last this many tokens before rollout.max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # soft overlong punishment at (and beyond) rollout.max_new_tokens
    scale: float = 1.0  # multiply rewards (after the overlong punishment) by this
    clip: Optional[float] = None  # clip scaled rewards to [-clip, clip]; null = off


@dataclass
class TrainConfig:
    steps: int = 30  # RL iterations
    prompts_per_step: int = 64  # prompts per iteration (each sampled rollout.n times)
    lr: float = 5e-4  # actor learning rate (AdamW, constant after warmup)
    warmup_steps: int = 0  # linear learning-rate warmup
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    mini_batches: int = 1  # optimizer steps per iteration (the batch is split into this many)
    epochs: int = 1  # passes over the iteration's batch
    micro_batch_size: int = 128  # sequences per forward/backward (gradient accumulation below a mini-batch), when not packing
    max_tokens_per_microbatch: int = 4096  # sequence packing: micro-batches of whole sequences with at most this many real tokens (a longer sequence goes alone), no padding computed; 0 = micro_batch_size padded rows
    share_prompts: bool = True  # packed micro-batches compute a prompt once for all its samples (each response attends to that one copy: the same numbers, fewer tokens); false: once per sample
    logits_chunk_tokens: int = 1024  # memory-lean logprobs and entropy: the LM head's logits computed (and recomputed in backward) this many tokens at a time, never [tokens, vocab] at once; 0 = all at once
    old_logprobs: str = "auto"  # the PPO ratio's old logprobs: rollout (the engine's, no extra pass), recompute (a trainer pass), auto (rollout when model.dtype is float32: the engine computes the trainer's distribution)
    logprob_check_every: int = 10  # with rollout old logprobs, every k steps the trainer's logprobs are computed anyway and their gap logged (rollout/logprob_abs_diff); 0 = never
    fsdp: bool = True  # wrap the actor and the critic (and, on several ranks, the frozen reference) with FSDP2 (fully_shard), each over its own group's ranks
    offload: bool = False  # FSDP2 CPU offload (actor and critic): sharded parameters, gradients and optimizer state live in host memory and the optimizer steps there; each layer is copied to the GPU for its forward and backward (GPU memory for long responses and larger models, at the cost of transfers); changes nothing on CPU devices
    activation_checkpointing: bool = False  # the actor and the critic keep only each decoder layer's input in the forward pass and recompute the rest in backward: far less activation memory for about one more forward pass of compute (the same gradients)
    ranks: int = 1  # trainer ranks: data parallel, FSDP2 sharding over a gloo group (each rank gets its share of the threads); the reference (kl_coef > 0) and the critic (gae) are groups of as many ranks, each its own gloo group, placed like the actor's
    weight_sync_bucket_mb: float = 256  # the weight sync after each step moves the trainer's weights to the engines through the object store in buckets of at most this many MiB (a larger weight goes alone), so no process holds a second full copy; metrics time/weight_sync, weight_sync/*
    max_bad_steps: int = 3  # optimizer steps with a non-finite loss or gradient norm are skipped and counted (actor/skipped_steps, critic/skipped_steps); this many in a row stop the run with an error


@dataclass
class CriticConfig:
    """The value model of PPO (algorithm.advantage=gae): the policy's transformer with a scalar value head,
    trained with the actor's train.mini_batches / epochs / micro_batch_size / fsdp settings."""

    lr: float = 1e-3  # critic learning rate (AdamW, constant after warmup)
    warmup_steps: int = 0  # linear learning-rate warmup of the critic
    weight_decay: float = 0.0  # critic AdamW weight decay
    grad_clip: float = 1.0  # critic max gradient norm


@dataclass
class EvalConfig:
    num_problems: int = 500  # held-out problems evaluated greedily before and after RL
    every: int = 10  # also evaluate every k RL steps (0 = only before and after; the curves of `m2flow demo --seeds`)
    max_new_tokens: int = 48  # response length cap in evaluation
    benchmarks: list[str] = field(default_factory=list)  # also evaluated at every evaluation point, with k samples per problem: `m2flow eval` benchmark names, e.g. [synthetic_mc,math500] (docs/eval.md); metrics eval/<name>/avg@k, pass@k, maj@k
    k: int = 8  # samples per problem on eval.benchmarks
    temperature: float = 0.6  # sampling temperature on eval.benchmarks (0 = greedy, with k=1)
    top_p: float = 0.95  # nucleus sampling on eval.benchmarks
    data_dir: str = ""  # directory of the eval.benchmarks files (aime24.jsonl, math500.parquet, ...; docs/eval.md)
    benchmark_problems: int = 0  # the first N problems of each of eval.benchmarks (0 = all)


@dataclass
class CheckpointConfig:
    every: int = 10  # save a resumable checkpoint every k steps (0 = only the final weights, no resume)
    keep_last: int = 2  # periodic checkpoints kept (0 = all; the final one is always kept)


@dataclass
class Config:
    name: str = "tiny-math-grpo"  # experiment name (run directory prefix)
    output_dir: str = "runs"  # parent directory of run directories
    seed: int = 0  # one seed for Python, NumPy, torch and sampling
    resume: str = ""  # continue a killed run exactly: its run directory, or "auto" (the newest unfinished run of this name)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------------------
# Loading, validation and saving

DTYPES = ("float32", "bfloat16")  # supported model.dtype values
PLACEMENTS = ("collocated", "disaggregated")  # cluster.placement's named layouts (else a spec: a mapping)
DEVICE_KINDS = ("auto", "cpu", "cuda")  # cluster.device values (m2flow.scheduler.devices)
TEMPLATES = ("chat", "plain")  # prompt templates (m2flow.data.templates)
BAD_ROWS = ("error", "skip")
OLD_LOGPROBS = ("auto", "rollout", "recompute")  # where train.old_logprobs come from  # what data.bad_rows does with a malformed or too long row
ROLLOUT_BACKENDS = ("m2flow", "hf")  # implemented rollout engines
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # estimators that need several samples per prompt
CRITIC_ESTIMATORS = ("gae",)  # advantage estimators computed from a critic's values (not registry entries)
TOKEN_REWARD_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline", "gae")  # accept per-token rewards (KL in the reward)


class ConfigError(ValueError):
    """A config file, override or combination of values is invalid."""


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides (later wins); validated."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _load_yaml(path), f"in {path}")
    for override in overrides or []:
        key, eq, _ = override.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"malformed override {override!r}: expected key=value, e.g. train.lr=1e-4")
        cfg = _merge(cfg, OmegaConf.from_dotlist([override]), f"in override {override!r}")
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. an interpolation that does not resolve
        raise ConfigError(f"cannot resolve config key '{e.full_key}': {_reason(e)}") from e
    except ValueError as e:  # a section's own check (EngineConfig: rollout.engine.kernels)
        raise ConfigError(f"invalid config: {e}") from e
    validate(out)
    return out


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express; raises ConfigError naming the keys."""

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    check(a.advantage not in GROUP_ESTIMATORS or r.n >= 2,
          f"rollout.n must be >= 2 when algorithm.advantage is {a.advantage!r} (a group needs several samples), "
          f"got {r.n}")
    check(r.temperature >= 0, f"rollout.temperature must be >= 0, got {r.temperature}")
    check(0 <= r.top_p <= 1, f"rollout.top_p must be in [0, 1], got {r.top_p}")
    e = r.engine
    check(e.kv_cache_gb >= 0, f"rollout.engine.kv_cache_gb must be >= 0 (0 = auto), got {e.kv_cache_gb}")
    check(0 < e.kv_cache_fraction <= 1, f"rollout.engine.kv_cache_fraction must be in (0, 1], got {e.kv_cache_fraction}")
    check(e.max_model_len >= 0, f"rollout.engine.max_model_len must be >= 0 (0 = the model's), got {e.max_model_len}")
    positive = {"train.steps": t.steps, "train.prompts_per_step": t.prompts_per_step,
                "train.micro_batch_size": t.micro_batch_size, "rollout.max_new_tokens": r.max_new_tokens,
                "eval.max_new_tokens": cfg.eval.max_new_tokens, "train.mini_batches": t.mini_batches,
                "train.epochs": t.epochs, "rollout.engine.max_num_seqs": e.max_num_seqs,
                "rollout.engine.block_size": e.block_size, "rollout.engine.max_num_batched_tokens": e.max_num_batched_tokens}
    for key, value in positive.items():
        check(value > 0, f"{key} must be positive, got {value}")
    for name in ("clip_ratio_low", "clip_ratio_high"):
        value = getattr(a, name)
        check(value >= 0, f"algorithm.{name} must be >= 0, got {value}")
    for key, value, valid in [("model.dtype", cfg.model.dtype, DTYPES),
                              ("cluster.device", cfg.cluster.device, DEVICE_KINDS),
                              ("data.template", cfg.data.template, TEMPLATES),
                              ("data.bad_rows", cfg.data.bad_rows, BAD_ROWS),
                              ("train.old_logprobs", cfg.train.old_logprobs, OLD_LOGPROBS)]:
        check(value in valid, f"{key} must be one of {', '.join(valid)}; got {value!r}")
    check(a.max_staleness in (0, 1), f"algorithm.max_staleness must be 0 (on-policy) or 1 (one-step off-policy), "
                                     f"got {a.max_staleness}")
    placement = cfg.cluster.placement
    check(isinstance(placement, dict) or placement in PLACEMENTS,
          f"cluster.placement must be one of {', '.join(PLACEMENTS)} or a spec mapping roles to devices (e.g. "
          f"{{rollout: '0', actor: '1'}}); got {placement!r}")
    if isinstance(placement, dict):  # the roles and device sets; indices past the cluster are checked at start-up
        from m2flow.scheduler.placement import PlacementError, plan_placement

        try:
            mode = plan_placement(placement, cfg.cluster.devices or 1 << 20).mode
        except PlacementError as e:
            raise ConfigError(str(e)) from None
    else:
        mode = placement
    if a.max_staleness:
        from m2flow.pipeline import streamable
        from m2flow.stages import old_logprobs_from_rollout

        check(mode != "collocated", "algorithm.max_staleness=1 overlaps the next step's rollout with this step's "
                                    "update on devices of their own: it needs cluster.placement disaggregated or "
                                    "hybrid, got collocated")
        rollout_old = old_logprobs_from_rollout(cfg)
        why_not = streamable(cfg, rollout_old)
        check(not why_not, f"algorithm.max_staleness=1 needs a streamed pipeline, but {why_not}")
        check(rollout_old, "algorithm.max_staleness=1 takes the PPO ratio against the sampling policy's logprobs: "
                           "it needs train.old_logprobs=rollout (or auto with model.dtype=float32)")
    from m2flow.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
    from m2flow.rewards import REWARDS

    for key, value, valid in [("algorithm.advantage", a.advantage,
                               sorted([*ADVANTAGE_ESTIMATORS.names(), *CRITIC_ESTIMATORS])),
                              ("algorithm.policy_loss", a.policy_loss, POLICY_LOSSES.names()),
                              ("algorithm.loss_agg", a.loss_agg, LOSS_AGGREGATIONS.names()),
                              ("algorithm.kl_estimator", a.kl_estimator, KL_ESTIMATORS.names()),
                              ("reward.name", cfg.reward.name, sorted(REWARDS)),
                              ("rollout.backend", r.backend, ROLLOUT_BACKENDS)]:
        check(value in valid, f"{key} must be one of {', '.join(valid)}; got {value!r}")
    _validate_algorithm(cfg, check)
    _validate_ranges(cfg, check)
    _validate_eval(cfg, check)
    _validate_rollout(cfg, check)
    _validate_paths(cfg, check)


def _validate_ranges(cfg: Config, check) -> None:
    """Values outside their meaningful range (issue 12): each error names the key and the valid range."""

    check(bool(cfg.name) and not any(bad in cfg.name for bad in ("/", "\\", "..", "\0")),
          f"name must be a plain name (no '/', '\\' or '..': the run directory must stay inside output_dir), "
          f"got {cfg.name!r}")
    t, r, rw, b, d = cfg.train, cfg.rollout, cfg.reward, cfg.base, cfg.data
    finite_positive = {"train.lr": t.lr, "reward.timeout_s": rw.timeout_s, "base.sft_lr": b.sft_lr,
                       "train.weight_sync_bucket_mb": t.weight_sync_bucket_mb}
    for key, value in finite_positive.items():
        check(math.isfinite(value) and value > 0, f"{key} must be a finite number > 0, got {value}")
    check(0 <= b.sft_final_lr_fraction <= 1, f"base.sft_final_lr_fraction must be in [0, 1], got {b.sft_final_lr_fraction}")
    check(math.isfinite(cfg.critic.lr), f"critic.lr must be a finite number, got {cfg.critic.lr}")
    check(math.isfinite(r.temperature), f"rollout.temperature must be a finite number >= 0, got {r.temperature}")
    check(t.grad_clip > 0, f"train.grad_clip must be > 0, got {t.grad_clip}")
    check(rw.format_penalty >= 0, f"reward.format_penalty must be >= 0 (no answer scores -format_penalty), "
                                  f"got {rw.format_penalty}")
    non_negative = {"rollout.top_k": r.top_k, "train.warmup_steps": t.warmup_steps,
                    "train.weight_decay": t.weight_decay, "critic.weight_decay": cfg.critic.weight_decay,
                    "algorithm.entropy_coef": cfg.algorithm.entropy_coef, "eval.every": cfg.eval.every,
                    "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep_last": cfg.checkpoint.keep_last,
                    "train.max_tokens_per_microbatch": t.max_tokens_per_microbatch,
                    "train.logprob_check_every": t.logprob_check_every,
                    "train.logits_chunk_tokens": t.logits_chunk_tokens,
                    "base.sft_steps": b.sft_steps, "base.sft_examples": b.sft_examples,
                    "cluster.devices": cfg.cluster.devices}
    for key, value in non_negative.items():
        check(value >= 0, f"{key} must be >= 0, got {value}")
    positive = {"rollout.n": r.n, "rollout.replicas": r.replicas, "train.ranks": t.ranks,
                "eval.num_problems": cfg.eval.num_problems,
                "reward.workers": rw.workers,
                "train.max_bad_steps": t.max_bad_steps,
                "data.synthetic_train_size": d.synthetic_train_size, "data.synthetic_eval_size": d.synthetic_eval_size,
                "base.hidden_size": b.hidden_size,
                "base.num_layers": b.num_layers, "base.num_heads": b.num_heads, "base.num_kv_heads": b.num_kv_heads,
                "base.intermediate_size": b.intermediate_size, "base.sft_batch_size": b.sft_batch_size}
    for key, value in positive.items():
        check(value >= 1, f"{key} must be >= 1, got {value}" + (
            " (held-out accuracy is measured before and after RL)" if key == "eval.num_problems" else ""))
    for key, value in {"data.synthetic_max_operand": d.synthetic_max_operand,
                       "data.synthetic_max_multiplier": d.synthetic_max_multiplier}.items():
        check(value >= 2, f"{key} must be >= 2, got {value}")
    check(not cfg.cluster.listen_all or cfg.cluster.address is None,
          "cluster.listen_all applies to a locally started Ray (cluster.address null); a cluster you join keeps "
          "its own network settings")
    check(cfg.cluster.device_memory_gb is None or cfg.cluster.device_memory_gb > 0,
          f"cluster.device_memory_gb must be > 0 or null (no budget), got {cfg.cluster.device_memory_gb}")
    check(cfg.cluster.num_cpus is None or cfg.cluster.num_cpus >= 1,
          f"cluster.num_cpus must be >= 1 or null (all of this machine's), got {cfg.cluster.num_cpus}")


def _validate_rollout(cfg: Config, check) -> None:
    check(not cfg.train.offload or cfg.train.fsdp, "train.offload needs train.fsdp=true (FSDP2 keeps the shards in host "
                                                   "memory)")
    check(cfg.train.ranks == 1 or cfg.train.fsdp,
          f"train.ranks={cfg.train.ranks} needs train.fsdp=true (FSDP2 averages the ranks' gradients)")
    r = cfg.rollout
    check(r.replicas == 1 or r.backend == "m2flow",
          f"rollout.replicas={r.replicas} needs rollout.backend=m2flow (its per-prompt seeding makes the samples "
          f"independent of the split); got backend {r.backend!r}")


def _validate_eval(cfg: Config, check) -> None:
    from m2flow.eval.benchmarks import BENCHMARKS

    e = cfg.eval
    for name in e.benchmarks:
        check(name in BENCHMARKS, f"eval.benchmarks: unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    check(e.k >= 1, f"eval.k must be >= 1, got {e.k}")
    check(e.temperature >= 0 and math.isfinite(e.temperature), f"eval.temperature must be >= 0, got {e.temperature}")
    check(0 < e.top_p <= 1, f"eval.top_p must be in (0, 1], got {e.top_p}")
    check(e.temperature > 0 or e.k == 1, f"eval.temperature=0 (greedy) gives k identical samples: set eval.k=1, got {e.k}")
    check(e.benchmark_problems >= 0, f"eval.benchmark_problems must be >= 0 (0 = all), got {e.benchmark_problems}")


def _validate_paths(cfg: Config, check) -> None:
    """Files named by the config exist (checked before a run directory is made or anything starts)."""
    from m2flow.data.datasets import SUFFIXES

    from m2flow.models.hub import is_hub_id

    path = cfg.model.path
    if path and not is_hub_id(path):  # a Hub id is fetched (and so checked) when the run starts
        check(os.path.isfile(os.path.join(path, "config.json")),
              f"model.path must be an HF model directory with a config.json, or a Hugging Face Hub id "
              f"(owner/name); {path!r} {'has none' if os.path.isdir(path) else 'does not exist'} "
              f"(empty = build the tiny base model)")
        check(any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")),
              f"model.path {path!r} has no tokenizer (tokenizer.json or tokenizer_config.json); save the "
              f"tokenizer with the model (tokenizer.save_pretrained)")
    for key, value in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if value:
            check(value.endswith(SUFFIXES), f"{key} must be a {' or '.join(SUFFIXES)} file, got {value!r}")
            check(os.path.isfile(value), f"{key}: file not found: {value!r} (empty = synthetic problems)")
    if cfg.resume not in ("", "auto"):
        check(os.path.isfile(os.path.join(cfg.resume, "config.yaml")),
              f"resume must be '', 'auto' or a run directory (with its config.yaml); {cfg.resume!r} "
              f"{'has no config.yaml' if os.path.isdir(cfg.resume) else 'does not exist'}")


def _validate_algorithm(cfg: Config, check) -> None:
    """The algorithm, reward-shaping and critic combinations (issue 4)."""
    a, rw, r, c = cfg.algorithm, cfg.reward, cfg.rollout, cfg.critic
    check(a.kl_coef >= 0, f"algorithm.kl_coef must be >= 0 (0 = no KL, no reference model), got {a.kl_coef}")
    check(a.filter_groups is False or r.n >= 2,
          f"algorithm.filter_groups needs rollout.n >= 2 (a single sample per prompt is never an informative "
          f"group, so every sample would be dropped), got rollout.n={r.n}; set algorithm.filter_groups=false")
    if a.clip_ratio_c is not None:
        check(a.policy_loss != "gspo",
              "algorithm.clip_ratio_c (dual-clip) is not defined for algorithm.policy_loss=gspo; set it to null "
              "or use policy_loss ppo_clip")
        check(a.clip_ratio_c > 1, f"algorithm.clip_ratio_c (dual-clip) must be > 1 (e.g. 3.0) or null, "
                                  f"got {a.clip_ratio_c}")
    check(a.tis_cap is None or a.tis_cap > 0, f"algorithm.tis_cap must be > 0 (e.g. 2.0) or null, got {a.tis_cap}")
    for name in ("gamma", "lam"):
        value = getattr(a, name)
        check(0 <= value <= 1, f"algorithm.{name} must be in [0, 1], got {value}")
    if a.kl_in_reward:
        check(a.kl_coef > 0, f"algorithm.kl_in_reward needs algorithm.kl_coef > 0 (the penalty's weight), "
                             f"got {a.kl_coef}")
        check(a.advantage in TOKEN_REWARD_ESTIMATORS,
              f"algorithm.kl_in_reward needs a token-level algorithm.advantage, one of "
              f"{', '.join(TOKEN_REWARD_ESTIMATORS)}; got {a.advantage!r} (use the KL loss term instead: "
              f"algorithm.kl_in_reward=false)")
    uses_critic = a.advantage in CRITIC_ESTIMATORS
    if a.value_clip is not None:
        check(uses_critic, f"algorithm.value_clip applies to the critic's value loss, which only "
                           f"algorithm.advantage={' or '.join(CRITIC_ESTIMATORS)} has; got advantage {a.advantage!r}")
        check(a.value_clip > 0, f"algorithm.value_clip must be > 0 or null, got {a.value_clip}")
    if uses_critic:
        check(c.lr > 0, f"critic.lr must be > 0 when algorithm.advantage={a.advantage!r} (the critic is trained), "
                        f"got {c.lr}")
    check(c.warmup_steps >= 0, f"critic.warmup_steps must be >= 0, got {c.warmup_steps}")
    check(c.grad_clip > 0, f"critic.grad_clip must be > 0, got {c.grad_clip}")
    check(a.dynamic_sampling_max_tries >= 1,
          f"algorithm.dynamic_sampling_max_tries must be >= 1 (1 = no resampling), got {a.dynamic_sampling_max_tries}")
    check(a.dynamic_sampling_max_tries == 1 or a.filter_groups,
          f"algorithm.dynamic_sampling_max_tries={a.dynamic_sampling_max_tries} resamples to replace dropped "
          f"groups, so it needs algorithm.filter_groups=true")
    check(0 <= rw.overlong_buffer <= r.max_new_tokens,
          f"reward.overlong_buffer must be in [0, rollout.max_new_tokens={r.max_new_tokens}] (0 = off), "
          f"got {rw.overlong_buffer}")
    check(rw.overlong_penalty >= 0, f"reward.overlong_penalty must be >= 0, got {rw.overlong_penalty}")
    check(rw.scale > 0, f"reward.scale must be > 0, got {rw.scale}")
    check(rw.clip is None or rw.clip > 0, f"reward.clip must be > 0 or null, got {rw.clip}")


def save_config(cfg: Config, path: str) -> None:
    """Write the fully resolved config as YAML, atomically (loadable again with load_config)."""
    from m2flow.io import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def config_to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (for logging and metrics sinks)."""
    return dataclasses.asdict(cfg)


def _load_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def _merge(cfg: DictConfig, src: DictConfig, where: str) -> DictConfig:
    """OmegaConf.merge, with its errors re-raised as ConfigError in our words."""
    try:
        return OmegaConf.merge(cfg, src)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(e.full_key, where)) from e
    except ValidationError as e:
        key = e.full_key or _find_section_mismatch(src, Config)
        if not key:
            raise ConfigError(f"invalid config ({where}): {_reason(e)}") from e
        expected = _type_name(_field_type(key))
        given = OmegaConf.select(src, key, throw_on_resolution_failure=False)
        if isinstance(given, DictConfig):
            given = OmegaConf.to_container(given)
        raise ConfigError(f"config key '{key}' expects {expected}, got {given!r} ({where})") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config ({where}): {_reason(e)}") from e


def _reason(e: OmegaConfBaseException) -> str:
    return str(e).splitlines()[0]  # OmegaConf appends full_key/object_type lines; we name the key ourselves


MOVED_KEYS = {  # keys that are gone, and what does their job now
    "rollout.sleep_between_steps": "cluster.context_switch (an engine sharing its devices frees its KV cache "
                                   "after every generation)",
}


def _unknown_key_message(full_key: str, where: str) -> str:
    if full_key in MOVED_KEYS:
        return f"config key '{full_key}' is gone: use {MOVED_KEYS[full_key]} ({where})"
    parent, _, name = full_key.rpartition(".")
    valid = [f.name for f in dataclasses.fields(_field_type(parent) if parent else Config)]
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    prefix = f"{parent}." if parent else ""
    hint = f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ";"
    return (f"unknown config key '{full_key}'{hint} valid keys under '{parent or '<root>'}': "
            f"{', '.join(valid)} ({where})")


def _field_type(dotted: str) -> typing.Any:
    """The annotated type of a dotted key, e.g. 'train.lr' -> float, 'train' -> TrainConfig."""
    tp: typing.Any = Config
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def _type_name(tp: typing.Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a section ({tp.__name__}) of keys, not a single value"
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _find_section_mismatch(src: DictConfig, cls: type, prefix: str = "") -> str | None:
    """Dotted key in `src` that gives a plain value where `cls` expects a section (OmegaConf omits it)."""
    hints = typing.get_type_hints(cls)
    for key, value in src.items_ex(resolve=False):
        tp = hints.get(key)
        if not dataclasses.is_dataclass(tp):
            continue
        if not isinstance(value, DictConfig):
            return f"{prefix}{key}"
        if found := _find_section_mismatch(value, tp, f"{prefix}{key}."):
            return found
    return None


def options_markdown() -> str:
    """Every option as a markdown table (key, type, default, doc), read from the dataclasses' source
    comments. `python -m m2flow.config > docs/configuration.md` regenerates the docs page."""
    import inspect

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls, prefix: str) -> None:
        docs = {}
        for line in inspect.getsource(cls).splitlines():
            name, sep, rest = line.strip().partition(":")
            if sep and "#" in rest and name.isidentifier():
                docs[name] = rest.split("#", 1)[1].strip()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            type_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            doc = docs.get(f.name, "").replace("|", "\\|")  # a table cell: its pipes escaped
            lines.append(f"| `{prefix}{f.name}` | {type_name} | `{default!r}` | {doc} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"


CONFIG_DOC_INTRO = """# Configuration

Every option, its type, its default and what it does. The defaults are the embedded demo experiment
(`m2flow demo`). A YAML file (`--config`) overrides them, and `key=value` pairs on the command line override
the file. An unknown key is an error that names the nearest valid key; a value of the wrong type names the
key and the expected type; impossible combinations (e.g. GRPO with `rollout.n=1`) are rejected before
anything starts. The fully resolved config is written to `<run_dir>/config.yaml`.

This page is generated from `m2flow/config.py` by `python -m m2flow.config > docs/configuration.md` (a test keeps it in sync).

"""


def configuration_doc() -> str:
    """The text of docs/configuration.md."""
    return CONFIG_DOC_INTRO + options_markdown()


if __name__ == "__main__":
    print(configuration_doc(), end="")

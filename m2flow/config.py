"""Experiment configuration: dataclasses used as OmegaConf structured configs.

Every option has a default, a type and a one-line doc (the comment after it). A YAML file in `configs/`
overrides the defaults, and `key=value` pairs on the command line override the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # Ray cluster address ("auto", "ray://host:10001"); None starts Ray locally
    num_cpus: Optional[int] = None  # CPUs for a locally started Ray; None = all of this machine's
    placement: str = "collocated"  # where worker groups run: collocated (all stages share the devices)


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory to start from; empty = the warm-started tiny base (see `base`)
    dtype: str = "float32"  # parameter dtype for training and rollout: float32 | bfloat16


@dataclass
class BaseModelConfig:
    """How the default experiment makes its own base model: a tiny Qwen2 + supervised warm start."""

    cache_dir: str = ".cache/m2flow/base"  # where the built base model is cached and reused
    hidden_size: int = 128  # transformer width
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    intermediate_size: int = 384  # SwiGLU hidden size
    sft_examples: int = 2000  # worked solutions available for supervised warm start (deliberately limited)
    sft_steps: int = 1500  # optimizer steps of supervised warm start
    sft_batch_size: int = 64  # sequences per supervised step
    sft_lr: float = 3e-3  # peak learning rate of supervised warm start (cosine decay)
    plateau_check_fraction: float = 0.75  # also evaluate the base at this fraction of sft_steps (plateau evidence)
    seed: int = 1234  # seed of the base model's init, data and SFT


@dataclass
class DataConfig:
    train_path: str = ""  # jsonl/parquet of RL prompts; empty = synthetic math problems
    eval_path: str = ""  # jsonl/parquet of held-out problems; empty = synthetic held-out split
    prompt_key: str = "question"  # field holding the problem text
    answer_key: str = "answer"  # field holding the ground-truth final answer
    template: str = "chat"  # prompt template: chat (tokenizer's chat template) | plain (question as is)
    synthetic_train_size: int = 50000  # synthetic RL problems (answers only, no worked solutions)
    synthetic_eval_size: int = 500  # synthetic held-out problems, disjoint from every training split
    synthetic_seed: int = 7  # seed of the synthetic problem generator


@dataclass
class RolloutConfig:
    backend: str = "hf"  # generation engine: hf (transformers generate with KV cache)
    n: int = 8  # samples per prompt (the GRPO group)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling threshold (1.0 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 48  # response length cap
    batch_size: int = 512  # sequences generated together


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"  # advantage estimator (registry name)
    norm_adv_by_std: bool = True  # GRPO: divide by the group's reward std
    policy_loss: str = "ppo_clip"  # policy loss (registry name)
    clip_ratio_low: float = 0.2  # PPO clip: lower bound is 1 - clip_ratio_low
    clip_ratio_high: float = 0.2  # PPO clip: upper bound is 1 + clip_ratio_high
    loss_agg: str = "token-mean"  # loss aggregation (registry name)
    kl_coef: float = 0.0  # weight of KL(actor || reference) in the loss; 0 = no reference model
    kl_estimator: str = "k3"  # KL estimator (registry name)
    entropy_coef: float = 0.0  # entropy bonus weight


@dataclass
class RewardConfig:
    name: str = "math"  # reward function (registry name)
    format_penalty: float = 0.0  # reward for a response with no extractable answer is -format_penalty
    timeout_s: float = 2.0  # per-response verification time limit


@dataclass
class TrainConfig:
    steps: int = 60  # RL iterations
    prompts_per_step: int = 64  # prompts per iteration (each sampled rollout.n times)
    lr: float = 1e-4  # actor learning rate (AdamW, constant after warmup)
    warmup_steps: int = 0  # linear learning-rate warmup
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    mini_batches: int = 1  # optimizer steps per iteration (the batch is split into this many)
    epochs: int = 1  # passes over the iteration's batch
    micro_batch_size: int = 128  # sequences per forward/backward (gradient accumulation below a mini-batch)
    fsdp: bool = True  # wrap the actor with FSDP2 (fully_shard) over the trainer's process group


@dataclass
class EvalConfig:
    num_problems: int = 500  # held-out problems evaluated greedily before and after RL
    every: int = 0  # also evaluate every k RL steps (0 = only before and after)
    max_new_tokens: int = 48  # response length cap in evaluation
    batch_size: int = 500  # sequences generated together in evaluation


@dataclass
class CheckpointConfig:
    every: int = 0  # save an HF checkpoint every k steps (0 = only at the end)
    keep_last: int = 2  # periodic checkpoints kept (the final one is always kept)


@dataclass
class Config:
    name: str = "tiny-math-grpo"  # experiment name (run directory prefix)
    output_dir: str = "runs"  # parent directory of run directories
    seed: int = 0  # one seed for Python, NumPy, torch and sampling
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

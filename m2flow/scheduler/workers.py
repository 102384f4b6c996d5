"""Worker shells run as Ray actors: each holds a model and calls pure code (engine, trainer)."""

from __future__ import annotations

import torch

from m2flow.batch import RolloutBatch
from m2flow.config import Config
from m2flow.rollout import Engine, EngineConfig, GenerateStats, HFEngine, Sample, SamplingParams
from m2flow.scheduler.devices import Placement, pin
from m2flow.training.actor import Actor, init_trainer_group
from m2flow.training.critic import Critic, load_value_model
from m2flow.training.checkpoint import load_hf_model, load_trainer, save_hf_checkpoint, save_trainer
from m2flow.training.forward import batch_logprobs
from m2flow.training.packing import use_varlen_attention
from m2flow.training.token_stats import use_lean_head


def _setup(threads: int, seed: int, placement: Placement | None) -> None:
    pin(placement, threads)
    torch.manual_seed(seed)


class RolloutWorker:
    def __init__(self, model_path: str, cfg: Config, threads: int = 1, placement: Placement | None = None):
        _setup(threads, cfg.seed, placement)
        r = cfg.rollout
        if r.backend == "hf":
            model, tokenizer = load_hf_model(model_path, cfg.model.dtype)
            self.engine = HFEngine(model, tokenizer, batch_size=r.batch_size)
        else:  # "m2flow" (validated)
            config = EngineConfig(max_num_seqs=r.batch_size, max_num_batched_tokens=r.max_num_batched_tokens,
                                  block_size=r.block_size, kv_cache_gb=r.kv_cache_gb,
                                  kv_cache_fraction=r.kv_cache_fraction, prefix_caching=r.prefix_caching,
                                  cuda_graphs=r.cuda_graphs, compile=r.compile)
            self.engine = Engine.from_pretrained(model_path, config, dtype=cfg.model.dtype)
        self.sleep_between_steps = r.sleep_between_steps

    def generate(self, prompts: list[str], params: SamplingParams, first_index: int = 0) -> list[Sample]:
        """Generates; with rollout.sleep_between_steps the engine wakes first and frees its KV cache after.
        `first_index`: the global index of prompts[0] (engine replicas; m2flow's engine only)."""
        if self.sleep_between_steps:
            self.engine.wake()
        samples = (self.engine.generate(prompts, params, first_index) if first_index
                   else self.engine.generate(prompts, params))
        if self.sleep_between_steps:
            self.engine.sleep()
        return samples

    def load_weights(self, state_dict: dict[str, torch.Tensor], policy_version: int) -> None:
        self.engine.load_weights(state_dict, policy_version)

    def stats(self) -> GenerateStats | None:
        """What m2flow's engine did in the last generate call (None with the transformers backend)."""
        return getattr(self.engine, "stats", None)


class ActorWorker:
    """One rank of the trainer group (train.ranks): with several, they form a gloo process group through the
    file `store` and FSDP2 shards the policy over them; rank 0 returns the full weights and writes files."""

    def __init__(self, model_path: str, cfg: Config, threads: int = 1, placement: Placement | None = None,
                 rank: int = 0, world_size: int = 1, store: str = ""):
        _setup(threads, cfg.seed, placement)
        self.rank = rank
        if world_size > 1:
            init_trainer_group(rank, world_size, store)
        model, self.tokenizer = load_hf_model(model_path, cfg.model.dtype)
        self.actor = Actor(model, cfg.train, cfg.algorithm, temperature=cfg.rollout.temperature)

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self.actor.compute_logprobs(batch)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        return self.actor.update(batch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.actor.state_dict()

    def save_checkpoint(self, path: str) -> str:
        weights = self.actor.state_dict()  # collective on N ranks: rank 0 gets the full weights and writes
        return save_hf_checkpoint(path, self.actor.hf_config, weights, self.tokenizer) if self.rank == 0 else path

    def save_state(self, path: str) -> None:
        """The policy as an HF checkpoint in directory `path`, plus the trainer's state (optimizer, LR schedule, RNG)."""
        save_trainer(path, self.actor, self.tokenizer)

    def load_state(self, path: str) -> None:
        load_trainer(path, self.actor)


class ReferenceWorker:
    """The frozen starting policy, for the KL term (created only when algorithm.kl_coef > 0)."""

    def __init__(self, model_path: str, cfg: Config, threads: int = 1, placement: Placement | None = None):
        _setup(threads, cfg.seed, placement)
        model, _ = load_hf_model(model_path, cfg.model.dtype)
        self.model = model.eval().requires_grad_(False)
        self.temperature = cfg.rollout.temperature  # token_logprobs treats 0 (greedy) as 1
        self.micro_batch_size, self.max_tokens = cfg.train.micro_batch_size, cfg.train.max_tokens_per_microbatch
        self.share_prompts = cfg.train.share_prompts
        if self.max_tokens > 0:
            use_varlen_attention(self.model)
        if cfg.train.logits_chunk_tokens > 0:
            use_lean_head(self.model, cfg.train.logits_chunk_tokens)

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return batch_logprobs(self.model, batch, self.temperature, self.micro_batch_size, self.max_tokens,
                              self.share_prompts)


class CriticWorker:
    """The value model of PPO (created only when algorithm.advantage=gae), started from the policy's weights."""

    def __init__(self, model_path: str, cfg: Config, threads: int = 1, placement: Placement | None = None):
        _setup(threads, cfg.seed, placement)
        self.critic = Critic(load_value_model(model_path, cfg.model.dtype), cfg.train, cfg.critic, cfg.algorithm)

    def compute_values(self, batch: RolloutBatch) -> torch.Tensor:
        return self.critic.compute_values(batch)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        return self.critic.update(batch)

    def save_state(self, path: str) -> None:
        """The value model (HF token-classification format) and its optimizer, LR schedule and RNG, in `path`."""
        save_trainer(path, self.critic)

    def load_state(self, path: str) -> None:
        load_trainer(path, self.critic)

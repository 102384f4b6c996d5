"""Worker shells run as Ray actors: each holds a model and calls pure code (engine, trainer)."""

from __future__ import annotations

import ray
import torch

from m2flow.batch import RolloutBatch
from m2flow.config import Config
from m2flow.rollout import Engine, EngineConfig, GenerateStats, HFEngine, Sample, SamplingParams
from m2flow.scheduler.devices import Placement, pin
from m2flow.training.actor import Actor, init_trainer_group
from m2flow.training.critic import Critic, load_value_model
from m2flow.training.checkpoint import load_hf_model, load_trainer, save_hf_checkpoint, save_trainer
from m2flow.training.reference import Reference
from m2flow.training.weight_sync import nbytes


def _setup(threads: int, seed: int, placement: Placement | None) -> None:
    pin(placement, threads)
    torch.manual_seed(seed)


class RolloutWorker:
    def __init__(self, model_path: str, cfg: Config, threads: int = 1, placement: Placement | None = None):
        _setup(threads, cfg.seed, placement)
        r = cfg.rollout
        if r.backend == "hf":
            model, tokenizer = load_hf_model(model_path, cfg.model.dtype)
            self.engine = HFEngine(model.to(placement.device if placement else "cpu"), tokenizer,
                                   batch_size=r.batch_size)
        else:  # "m2flow" (validated)
            config = EngineConfig(max_num_seqs=r.batch_size, max_num_batched_tokens=r.max_num_batched_tokens,
                                  block_size=r.block_size, kv_cache_gb=r.kv_cache_gb,
                                  kv_cache_fraction=r.kv_cache_fraction, prefix_caching=r.prefix_caching,
                                  cuda_graphs=r.cuda_graphs, compile=r.compile)
            self.engine = Engine.from_pretrained(model_path, config, dtype=cfg.model.dtype,
                                                 device=placement.device if placement else "cpu")
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

    def load_weight_buckets(self, buckets: list[ray.ObjectRef], policy_version: int) -> None:
        """The trainer's weights, from the object store (ActorWorker.weight_buckets), loaded in place bucket by
        bucket: the next bucket is fetched once the last one is loaded, so the worker never holds more than one
        besides the engine's weights. (The references arrive inside a list, which Ray passes unresolved.)"""

        def weights():
            for ref in buckets:
                yield from ray.get(ref).items()

        self.engine.load_weights(weights(), policy_version)

    def set_policy_version(self, policy_version: int) -> None:
        """The weights are unchanged but count as version `policy_version` (a step without an update)."""
        self.engine.policy_version = policy_version

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
        device = placement.device if placement else "cpu"
        if world_size > 1:
            init_trainer_group(rank, world_size, store, device)
        # on a GPU a bfloat16 policy trains in mixed precision: float32 master weights, bfloat16 compute
        mixed = device == "cuda" and cfg.model.dtype == "bfloat16" and cfg.train.fsdp
        model, self.tokenizer = load_hf_model(model_path, "float32" if mixed else cfg.model.dtype)
        self.actor = Actor(model.to(device), cfg.train, cfg.algorithm, temperature=cfg.rollout.temperature,
                           param_dtype=torch.bfloat16 if mixed else None)

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self.actor.compute_logprobs(batch)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        return self.actor.update(batch)

    def weight_buckets(self, bucket_mb: float) -> tuple[list[ray.ObjectRef], int]:
        """The full weights for the engines, gathered weight by weight (a collective: every rank runs this) into
        buckets of at most `bucket_mb` MiB. Rank 0 puts each bucket into the object store as it is complete and
        returns (the references in order, bytes in all); the other ranks return ([], 0)."""
        refs, total = [], 0
        for bucket in self.actor.weight_buckets(bucket_mb):
            if self.rank == 0:
                refs.append(ray.put(bucket))
                total += sum(nbytes(t) for t in bucket.values())
        return refs, total

    def save_checkpoint(self, path: str) -> str:
        weights = self.actor.state_dict()  # collective on N ranks: rank 0 gets the full weights and writes
        return save_hf_checkpoint(path, self.actor.hf_config, weights, self.tokenizer) if self.rank == 0 else path

    def save_state(self, path: str) -> None:
        """The policy as an HF checkpoint in directory `path`, plus the trainer's state (optimizer, LR schedule, RNG)."""
        save_trainer(path, self.actor, self.tokenizer)

    def load_state(self, path: str) -> None:
        load_trainer(path, self.actor)


class ReferenceWorker:
    """One rank of the frozen starting policy's group, for the KL term (created only when algorithm.kl_coef > 0):
    train.ranks ranks placed like the actor's, forming their own gloo group through the file `store`; FSDP2 shards
    the weights over them and each computes its share of the rows (training/reference.py)."""

    def __init__(self, model_path: str, cfg: Config, threads: int = 1, placement: Placement | None = None,
                 rank: int = 0, world_size: int = 1, store: str = ""):
        _setup(threads, cfg.seed, placement)
        device = placement.device if placement else "cpu"
        if world_size > 1:
            init_trainer_group(rank, world_size, store, device)
        model, _ = load_hf_model(model_path, cfg.model.dtype)  # frozen: no float32 master weights in bfloat16
        self.reference = Reference(model.to(device), cfg.train, temperature=cfg.rollout.temperature)

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """The whole batch's reference logprobs, on every rank."""
        return self.reference.compute_logprobs(batch)


class CriticWorker:
    """One rank of PPO's value model group (created only when algorithm.advantage=gae), started from the policy's
    weights: train.ranks ranks placed like the actor's, forming their own gloo group through the file `store`;
    FSDP2 shards the critic over them and its update is data parallel by tokens, as the actor's."""

    def __init__(self, model_path: str, cfg: Config, threads: int = 1, placement: Placement | None = None,
                 rank: int = 0, world_size: int = 1, store: str = ""):
        _setup(threads, cfg.seed, placement)
        device = placement.device if placement else "cpu"
        if world_size > 1:
            init_trainer_group(rank, world_size, store, device)
        mixed = device == "cuda" and cfg.model.dtype == "bfloat16" and cfg.train.fsdp  # as the actor's
        model = load_value_model(model_path, "float32" if mixed else cfg.model.dtype)
        self.critic = Critic(model.to(device), cfg.train, cfg.critic, cfg.algorithm,
                             param_dtype=torch.bfloat16 if mixed else None)

    def compute_values(self, batch: RolloutBatch) -> torch.Tensor:
        """The whole batch's values, on every rank."""
        return self.critic.compute_values(batch)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """The same metrics on every rank (all-reduced)."""
        return self.critic.update(batch)

    def save_state(self, path: str) -> None:
        """The value model (HF token-classification format) and its optimizer, LR schedule and RNG, in `path`
        (collective: every rank calls it; rank 0 writes the HF files)."""
        save_trainer(path, self.critic)

    def load_state(self, path: str) -> None:
        load_trainer(path, self.critic)

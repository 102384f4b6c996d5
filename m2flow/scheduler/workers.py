"""Worker shells run as Ray actors: each holds a model and calls pure code (engine, trainer). A worker gets what
it starts from (`Start`: the model, its dtype, the seed) and its role's config sections, not the whole Config."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import ray
import torch

from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, Config, CriticConfig, RolloutConfig, TrainConfig
from m2flow.rollout import Engine, GenerateStats, HFEngine, Sample, SamplingParams
from m2flow.scheduler.context import Offloadable, Switch, SwitchSpec
from m2flow.scheduler.devices import Placement, pin
from m2flow.timeline import Recorder, Span
from m2flow.training.actor import Actor, init_trainer_group
from m2flow.training.critic import Critic, load_value_model
from m2flow.training.checkpoint import load_hf_model, load_trainer, save_hf_checkpoint, save_trainer
from m2flow.training.offload import TrainerState
from m2flow.training.reference import Reference
from m2flow.training.weight_sync import load_full_weights, nbytes


@dataclass(frozen=True)
class Start:
    """What every worker starts from, besides its role's own config section: the model (an HF directory) in
    model.dtype, and the run's seed."""

    model_path: str
    dtype: str
    seed: int

    @classmethod
    def of(cls, model_path: str, cfg: Config) -> "Start":
        return cls(model_path, cfg.model.dtype, cfg.seed)


PARAMS = {"params"}  # what a trainer's forward needs on the device (training/offload.py)
TRAINING = {"params", "optimizer"}  # and its update


def _setup(threads: int, seed: int, placement: Placement | None, rank: int = 0, world_size: int = 1,
           store: str = "") -> str:
    """Pins and seeds the worker and, as rank `rank` of a group of `world_size` > 1, joins the group's process
    group through the file `store`; the torch device it computes on."""
    pin(placement, threads)
    torch.manual_seed(seed)
    device = placement.device if placement else "cpu"
    if world_size > 1:
        init_trainer_group(rank, world_size, store, device)
    return device


def _trainer_dtype(start: Start, device: str, fsdp: bool) -> tuple[str, torch.dtype | None]:
    """(the dtype a trainer loads the model in, its compute dtype): on a GPU a bfloat16 policy trains in mixed
    precision, float32 master weights and bfloat16 compute (FSDP2); otherwise model.dtype throughout."""
    mixed = device == "cuda" and start.dtype == "bfloat16" and fsdp
    return ("float32", torch.bfloat16) if mixed else (start.dtype, None)


class _Worker:
    """What every worker shell has: a timeline of what it did (m2flow/timeline.py), drained by the runner, and its
    turns on shared devices (scheduler/context.py): each phase on the device runs in `self.switch.phase(...)`."""

    timeline: Recorder
    switch: Switch

    def _start(self, role: str, rank: int, placement: Placement | None, state: Offloadable,
               switch: SwitchSpec | None) -> None:
        devices = placement.devices if placement else ""
        self.timeline = Recorder(role, rank, devices)
        capacity = None
        if placement is not None and placement.device == "cuda":
            capacity = float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        self.switch = Switch(switch, f"{role} rank {rank}", state, self.timeline, devices, capacity)

    def drain_timeline(self) -> list[Span]:
        """The spans recorded since the last call."""
        return self.timeline.drain()


class RolloutWorker(_Worker):
    def __init__(self, start: Start, r: RolloutConfig, threads: int = 1, placement: Placement | None = None,
                 rank: int = 0, switch: SwitchSpec | None = None):
        device = _setup(threads, start.seed, placement)
        if r.backend == "hf":
            model, tokenizer = load_hf_model(start.model_path, start.dtype)
            self.engine = HFEngine(model.to(device), tokenizer, batch_size=r.engine.max_num_seqs)
        else:  # "m2flow" (validated)
            self.engine = Engine.from_pretrained(start.model_path, r.engine, dtype=start.dtype, device=device)
        self._start("rollout", rank, placement, self.engine, switch)

    def generate(self, prompts: list[str], params: SamplingParams, first_index: int = 0) -> list[Sample]:
        """Generates. `first_index`: the global index of prompts[0] (engine replicas; m2flow's engine only)."""
        with self._generating(prompts):
            return (self.engine.generate(prompts, params, first_index) if first_index
                    else self.engine.generate(prompts, params))

    @contextlib.contextmanager
    def _generating(self, prompts: list[str]):
        """A generate call: a phase on the device (sharing it, the engine takes its turn: onloads its weights and
        a KV cache, and frees them after) and a span on the timeline."""
        with self.switch.phase("generate", set(self.engine.part_bytes())):
            with self.timeline.span("generate", prompts=len(prompts)):
                yield

    def generate_into(self, channel, prompts: list[str], params: SamplingParams,
                      first_index: int = 0) -> tuple[int, GenerateStats | None, list[Span]]:
        """Streams the samples into `channel` (scheduler/channel.py): each prompt's group, with global prompt
        indices, put as soon as its n samples are done (weighted by their tokens), while the others decode; the
        same samples as generate (m2flow's engine only). Returns (the number of groups put, the engine's stats of
        this call, the timeline's spans since it was last drained)."""
        with self._generating(prompts):
            prompt_ids = [self.engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            groups = 0
            for group in self.engine.stream_groups(prompt_ids, params, first_index):
                for sample in group:
                    sample.prompt_index += first_index
                self.timeline.mark("group", prompt=group[0].prompt_index)
                channel.put(group, weight=sum(len(s.prompt_ids) + len(s.token_ids) for s in group))
                groups += 1
        # the engine's stats and the timeline come with the result: the replica may be generating the next step
        # by the time the driver asks (one-step off-policy), and a call would wait behind that
        return groups, self.stats(), self.timeline.drain()

    def load_weight_buckets(self, buckets: list[ray.ObjectRef], policy_version: int) -> None:
        """The trainer's weights, from the object store (ActorWorker.weight_buckets), loaded in place bucket by
        bucket: the next bucket is fetched once the last one is loaded, so the worker never holds more than one
        besides the engine's weights. (The references arrive inside a list, which Ray passes unresolved.)"""

        def weights():
            for ref in buckets:
                yield from ray.get(ref).items()

        with self.switch.phase("weight_sync", {"weights"}), self.timeline.span("weight_sync", buckets=len(buckets)):
            self.engine.load_weights(weights(), policy_version)

    def set_policy_version(self, policy_version: int) -> None:
        """The weights are unchanged but count as version `policy_version` (a step without an update)."""
        self.engine.policy_version = policy_version

    def stats(self) -> GenerateStats | None:
        """What m2flow's engine did in the last generate call (None with the transformers backend)."""
        return getattr(self.engine, "stats", None)


class ActorWorker(_Worker):
    """One rank of the trainer group (train.ranks): with several, they form a gloo process group through the
    file `store` and FSDP2 shards the policy over them; rank 0 returns the full weights and writes files."""

    def __init__(self, start: Start, train: TrainConfig, algorithm: AlgorithmConfig, temperature: float,
                 threads: int = 1, placement: Placement | None = None, rank: int = 0, world_size: int = 1,
                 store: str = "", switch: SwitchSpec | None = None):
        """`temperature`: the rollout's (the logprobs are those of the distribution it samples)."""
        device = _setup(threads, start.seed, placement, rank, world_size, store)
        self.rank = rank
        load_dtype, compute_dtype = _trainer_dtype(start, device, train.fsdp)
        model, self.tokenizer = load_hf_model(start.model_path, load_dtype)
        self.actor = a = Actor(model.to(device), train, algorithm, temperature=temperature, param_dtype=compute_dtype)
        self._start("actor", rank, placement, TrainerState(a.model, a.device, a.optimizer, train.offload,
                                                           accumulating=lambda: a.pending is not None), switch)

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        with self.switch.phase("logprobs", PARAMS), self.timeline.span("logprobs", rows=len(batch)):
            return self.actor.compute_logprobs(batch)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        with self.switch.phase("update", TRAINING), self.timeline.span("update", rows=len(batch)):
            return self.actor.update(batch)

    def learn(self, rows: RolloutBatch | None, step_after: bool) -> dict[str, float]:
        """The streamed update (a pipelined placement): adds the gradients of `rows` (None: none) and, with
        `step_after`, takes the optimizer step on everything added since the last one. Returns {} or the step's
        metrics."""
        with self.switch.phase("update", TRAINING):
            if rows is not None:
                with self.timeline.span("update", rows=len(rows)):
                    self.actor.accumulate(rows)
            if not step_after:
                return {}
            with self.timeline.span("optimizer_step"):
                return self.actor.optimizer_step()

    def streamed_update_metrics(self) -> dict[str, float]:
        """The streamed update's metrics over its optimizer steps since the last call, as `update` returns them."""
        return self.actor.streamed_update_metrics()

    def weight_buckets(self, bucket_mb: float) -> tuple[list[ray.ObjectRef], int]:
        """The full weights for the engines, gathered weight by weight (a collective: every rank runs this) into
        buckets of at most `bucket_mb` MiB. Rank 0 puts each bucket into the object store as it is complete and
        returns (the references in order, bytes in all); the other ranks return ([], 0)."""
        refs, total = [], 0
        with self.switch.phase("weight_sync", PARAMS), self.timeline.span("weight_sync"):
            for bucket in self.actor.weight_buckets(bucket_mb):
                if self.rank == 0:
                    refs.append(ray.put(bucket))
                    total += sum(nbytes(t) for t in bucket.values())
        return refs, total

    def save_checkpoint(self, path: str) -> str:
        with self.switch.phase("checkpoint", PARAMS):
            weights = self.actor.state_dict()  # collective on N ranks: rank 0 gets the full weights and writes
        return save_hf_checkpoint(path, self.actor.hf_config, weights, self.tokenizer) if self.rank == 0 else path

    def save_state(self, path: str) -> None:
        """The policy as an HF checkpoint in directory `path`, plus the trainer's state (optimizer, LR schedule, RNG)."""
        with self.switch.phase("checkpoint", TRAINING):
            save_trainer(path, self.actor, self.tokenizer)

    def load_state(self, path: str) -> None:
        with self.switch.phase("resume", TRAINING):
            load_trainer(path, self.actor)


class ReferenceWorker(_Worker):
    """One rank of the frozen starting policy's group, for the KL term (created only when algorithm.kl_coef > 0):
    train.ranks ranks placed like the actor's, forming their own gloo group through the file `store`; FSDP2 shards
    the weights over them and each computes its share of the rows (training/reference.py)."""

    ROLE = "reference"

    def __init__(self, start: Start, train: TrainConfig, temperature: float, threads: int = 1,
                 placement: Placement | None = None, rank: int = 0, world_size: int = 1, store: str = "",
                 switch: SwitchSpec | None = None):
        device = _setup(threads, start.seed, placement, rank, world_size, store)
        model, _ = load_hf_model(start.model_path, start.dtype)  # frozen: no float32 master weights in bfloat16
        self.reference = Reference(model.to(device), train, temperature=temperature)
        self._start(self.ROLE, rank, placement, TrainerState(self.reference.model, device), switch)

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """The whole batch's reference logprobs, on every rank."""
        with self.switch.phase("logprobs", PARAMS), self.timeline.span("logprobs", rows=len(batch)):
            return self.reference.compute_logprobs(batch)


class InferenceWorker(ReferenceWorker):
    """One rank of the policy's logprob group on the `inference` devices (created when they are apart from the
    actor's and old logprobs come from a trainer pass): the reference's shell, whose weights follow the actor's,
    synced after every step as the engines' are. So it holds the weights the step's samples came from while the
    actor steps: old logprobs for every mini-batch, computed off the actor's devices."""

    ROLE = "inference"

    def load_weight_buckets(self, buckets: list[ray.ObjectRef], policy_version: int) -> None:
        """The actor's weights from the object store (ActorWorker.weight_buckets), bucket by bucket."""
        with self.switch.phase("weight_sync", PARAMS), self.timeline.span("weight_sync", buckets=len(buckets)):
            for ref in buckets:
                load_full_weights(self.reference.model, ray.get(ref))


class CriticWorker(_Worker):
    """One rank of PPO's value model group (created only when algorithm.advantage=gae), started from the policy's
    weights: train.ranks ranks placed like the actor's, forming their own gloo group through the file `store`;
    FSDP2 shards the critic over them and its update is data parallel by tokens, as the actor's."""

    def __init__(self, start: Start, train: TrainConfig, critic: CriticConfig, algorithm: AlgorithmConfig,
                 threads: int = 1, placement: Placement | None = None, rank: int = 0, world_size: int = 1,
                 store: str = "", switch: SwitchSpec | None = None):
        device = _setup(threads, start.seed, placement, rank, world_size, store)
        load_dtype, compute_dtype = _trainer_dtype(start, device, train.fsdp)  # as the actor's
        model = load_value_model(start.model_path, load_dtype)
        self.critic = c = Critic(model.to(device), train, critic, algorithm, param_dtype=compute_dtype)
        self._start("critic", rank, placement, TrainerState(c.model, c.device, c.optimizer, train.offload), switch)

    def compute_values(self, batch: RolloutBatch) -> torch.Tensor:
        """The whole batch's values, on every rank."""
        with self.switch.phase("values", PARAMS), self.timeline.span("values", rows=len(batch)):
            return self.critic.compute_values(batch)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """The same metrics on every rank (all-reduced)."""
        with self.switch.phase("update", TRAINING), self.timeline.span("update", rows=len(batch)):
            return self.critic.update(batch)

    def save_state(self, path: str) -> None:
        """The value model (HF token-classification format) and its optimizer, LR schedule and RNG, in `path`
        (collective: every rank calls it; rank 0 writes the HF files)."""
        with self.switch.phase("checkpoint", TRAINING):
            save_trainer(path, self.critic)

    def load_state(self, path: str) -> None:
        with self.switch.phase("resume", TRAINING):
            load_trainer(path, self.critic)

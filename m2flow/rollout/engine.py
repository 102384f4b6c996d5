"""m2flow's generation engine: paged KV cache, continuous batching, shared prompt prefixes, exact logprobs.

    engine = Engine.from_pretrained("path/to/hf_model")
    samples = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=512, seed=0))

One ``generate`` call runs to completion: its sequences are added to the batcher, and ``step()`` runs
until all have finished. The n samples of a prompt share the prompt's full KV blocks.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open

from m2flow.config import EngineConfig
from m2flow.rollout.batcher import Batcher
from m2flow.rollout.block_manager import BlockManager
from m2flow.rollout.model import PACKED, CausalLM, ModelArgs, shard_sizes
from m2flow.rollout.model_runner import ModelRunner, kv_bytes_per_token
from m2flow.rollout.sequence import SeqParams, Sequence, Status
from m2flow.rollout.types import GenerateStats, Sample, SamplingParams

GiB = 1 << 30


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CausalLM:
    """A CausalLM from an HF model directory (config.json + *.safetensors), without transformers."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"not an HF model directory (no config.json): {path}")
    with open(config_path) as f:
        args = ModelArgs.from_hf(json.load(f))
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    model = empty_model(args, dtype, device)

    def tensors():
        for name in files:
            with safe_open(os.path.join(path, name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    load_weights(model, tensors(), strict=True)
    return model.eval().requires_grad_(False)


def empty_model(args: ModelArgs, dtype: torch.dtype, device) -> CausalLM:
    """A CausalLM with uninitialised weights (to be loaded), allocated once on `device`."""
    with torch.device("meta"):
        model = CausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # to_empty made the tied head a separate tensor
    model.init_rope(args.max_position_embeddings)  # (meta had none)
    return model


@torch.no_grad()
def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = False) -> int:
    """Copies tensors named as in HF checkpoints into `model`'s parameters, in place (no reallocation),
    one at a time, so callers can stream buckets: q/k/v and gate/up go to their rows of the fused
    projections (see model.PACKED). `lm_head.weight` is skipped when tied. With `strict`, every weight
    must be given. Returns how many tensors were loaded; an unknown name or a shape mismatch raises."""
    params = dict(model.named_parameters())
    tied = model.args.tie_word_embeddings
    expected = {name for name in _hf_names(model) if not (tied and name == "lm_head.weight")}
    loaded = set()
    for name, tensor in weights:
        if tied and name == "lm_head.weight":
            continue
        if name not in expected:
            raise ValueError(f"weight {name!r} does not belong to the model (e.g. {next(iter(sorted(expected)))!r})")
        target = _target(model, params, name)
        if target.shape != tensor.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        target.copy_(tensor)
        loaded.add(name)
    missing = sorted(expected - loaded)
    if strict and missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
    return len(loaded)


def _split(name: str) -> tuple[str, str, str] | None:
    """'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn.', 'q_proj', 'weight')."""
    prefix, _, rest = name.rpartition(".")[0].rpartition(".")
    return (prefix + ".", rest, name.rpartition(".")[2]) if rest in PACKED else None


def _target(model: CausalLM, params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The parameter (or the rows of a fused parameter) that HF weight `name` maps to."""
    parts = _split(name)
    if parts is None:
        return params[name]
    prefix, proj, kind = parts
    fused, shard = PACKED[proj]
    sizes = shard_sizes(model.args, fused)
    return params[f"{prefix}{fused}.{kind}"].narrow(0, sum(sizes[:shard]), sizes[shard])


def _hf_names(model: CausalLM) -> list[str]:
    """The HF checkpoint names of `model`'s weights (fused parameters expanded into their parts)."""
    inverse: dict[str, list[str]] = {}
    for proj, (fused, _) in PACKED.items():
        inverse.setdefault(fused, []).append(proj)
    names = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        prefix, _, kind = name.rpartition(".")
        head, _, module = prefix.rpartition(".")
        names += [f"{head}.{p}.{kind}" for p in inverse[module]] if module in inverse else [name]
    return names


class Engine:
    def __init__(self, model: CausalLM, tokenizer, config: EngineConfig | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        c = self.config
        self.max_model_len = c.max_model_len or model.args.max_position_embeddings
        self.num_blocks = self._num_blocks()
        self.block_manager = BlockManager(self.num_blocks, c.block_size, c.prefix_caching)
        self.batcher = Batcher(self.block_manager, c.max_num_seqs, c.max_num_batched_tokens)
        cuda = next(model.parameters()).device.type == "cuda"
        graphs = cuda and c.cuda_graphs
        if c.kernels == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernels='triton' needs a GPU (on CPU only Triton's interpreter runs it: "
                             "TRITON_INTERPRET=1, for tests); use 'auto' or 'torch'")
        triton_kernels = c.kernels == "triton" or (c.kernels == "auto" and cuda)
        if c.compile and (triton_kernels or graphs):
            raise ValueError("compile applies to the eager PyTorch decode path: on a GPU set kernels='torch' and "
                             "cuda_graphs=false with it (the Triton kernels and CUDA graphs already fuse the step)")
        self.runner = ModelRunner(model, c.block_size, self.num_blocks, c.max_num_seqs, self.max_model_len,
                                  triton_kernels=triton_kernels, static_decode=graphs, cuda_graphs=graphs,
                                  compile=c.compile)
        self.policy_version = 0
        self.sleeping = False
        self._next_id = 0
        self.stats = GenerateStats()  # of the last generate call

    @classmethod
    def from_pretrained(cls, path: str, config: EngineConfig | None = None, dtype: str = "float32",
                        device: str = "cpu") -> "Engine":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(load_model(path, getattr(torch, dtype), device), tokenizer, config)

    @classmethod
    def from_model(cls, hf_model, tokenizer, config: EngineConfig | None = None) -> "Engine":
        """An engine holding a copy of a transformers model's weights (e.g. of a model being trained)."""
        p = next(hf_model.parameters())
        model = empty_model(ModelArgs.from_hf(hf_model.config.to_dict()), p.dtype, p.device)
        load_weights(model, hf_model.state_dict().items(), strict=True)
        return cls(model, tokenizer, config)

    def _num_blocks(self) -> int:
        c = self.config
        p = next(self.model.parameters())
        per_block = kv_bytes_per_token(self.model, p.dtype) * c.block_size
        budget = c.kv_cache_gb * GiB
        if budget <= 0:
            if p.device.type == "cuda":
                budget = torch.cuda.mem_get_info(p.device)[0] * c.kv_cache_fraction
            else:
                budget = GiB
        needed = c.max_num_seqs * -(-self.max_model_len // c.block_size)  # never more than can be used
        num_blocks = min(int(budget // per_block), needed)
        if num_blocks < 2:
            raise ValueError(f"KV cache budget of {budget / GiB:.3f} GiB holds {num_blocks} blocks of "
                             f"{c.block_size} tokens ({per_block} bytes each); raise kv_cache_gb")
        return num_blocks

    # ---- weights and memory -------------------------------------------------------------------------

    def load_weights(self, weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     policy_version: int) -> None:
        """In-place weight update by parameter name (a dict, or an iterable of (name, tensor) buckets);
        cached prefixes are dropped since their KV came from the old weights."""
        load_weights(self.model, weights.items() if isinstance(weights, dict) else weights)
        self.block_manager.reset_prefix_cache()
        self.policy_version = policy_version

    def sleep(self, offload_weights: bool = False) -> None:
        """Frees the KV cache (and moves the weights to CPU with `offload_weights`) so training can use
        the device; `wake()` restores both. Cached prefixes are forgotten."""
        self.offload({"kv_cache", "weights"} if offload_weights else {"kv_cache"})

    def wake(self) -> None:
        self.onload({"weights", "kv_cache"})

    def part_bytes(self) -> dict[str, float]:
        """The bytes of the engine's state in the parts context switching moves (scheduler/context.py): "weights"
        and "kv_cache" (0 while freed)."""
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        kv = self.runner.kv_cache
        return {"weights": float(weights), "kv_cache": float(kv.numel() * kv.element_size() if kv is not None else 0)}

    def onload(self, parts: set[str]) -> None:
        """Brings `parts` back onto the engine's device: the weights, and a new (empty) KV cache. Generating needs
        both."""
        if "weights" in parts:
            self.model.to(self.runner.device)
        if "kv_cache" in parts and self.runner.kv_cache is None:
            self.runner.allocate_kv()
            self.sleeping = False

    def offload(self, parts: set[str]) -> None:
        """Frees the KV cache ("kv_cache"; cached prefixes are forgotten) and moves the weights to host memory
        ("weights"; a no-op on a CPU device)."""
        if not self.batcher.is_finished():
            raise RuntimeError("cannot sleep while sequences are being generated")
        if "kv_cache" in parts:
            self.runner.free_kv()
            self.block_manager.reset_prefix_cache()
            self.sleeping = True
        if "weights" in parts and self.runner.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    # ---- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams, first_index: int = 0) -> list[Sample]:
        """Samples `params.n` responses per prompt; returns them prompt-major (all of prompt 0 first).
        `first_index`: the global index of prompts[0] when a larger call is split across engine replicas;
        sample j of global prompt i is seeded by (params.seed, i, j) however the call is split."""
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate_ids(prompt_ids, params, first_index)

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, first_index: int = 0) -> list[Sample]:
        """generate() from token ids: every group, prompt-major (sample j of a prompt in order j)."""
        groups = sorted(self.stream_groups(prompt_ids, params, first_index), key=lambda g: g[0].prompt_index)
        return [sample for group in groups for sample in group]

    def stream_groups(self, prompt_ids: list[list[int]], params: SamplingParams,
                      first_index: int = 0) -> Iterator[list[Sample]]:
        """The same samples as generate_ids, but each prompt's group of `params.n` is yielded as soon as its last
        sample finishes, while the other sequences keep decoding (the streaming shape a pipelined rollout feeds
        a channel with); groups come in the order they complete. Every prompt is checked and queued before the
        first step; closing the iterator early drops the sequences still queued or running."""
        if self.sleeping:
            raise RuntimeError("the engine is asleep: call wake() first")
        base_seed = params.seed if params.seed is not None else random.getrandbits(32)
        stops = frozenset() if params.ignore_eos else frozenset({self.tokenizer.eos_token_id, *params.stop_token_ids} - {None})
        seqs = []
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the engine's max_model_len is "
                                 f"{self.max_model_len}")
            for j in range(params.n):
                seed = hash((base_seed, first_index + i, j)) & 0xFFFFFFFF
                seq_params = SeqParams(params.temperature, params.top_p, params.top_k, params.max_new_tokens,
                                       stops, tuple(params.stop_strings), seed)
                seqs.append(Sequence(self._next_id, list(ids), len(ids), seq_params, prompt_index=i))
                self._next_id += 1
        for seq in seqs:  # all checked before any is queued: a refused call leaves the engine as it was
            self.batcher.check_fits(seq, min(len(seq) + params.max_new_tokens, self.max_model_len))
        for seq in seqs:
            self.batcher.add(seq)
        self.stats = GenerateStats(prompt_tokens=sum(len(s) for s in seqs))  # seconds: inside the engine's steps
        preemptions = self.batcher.num_preemptions
        unfinished = [params.n] * len(prompt_ids)  # samples still running, per prompt
        try:
            while not self.batcher.is_finished():
                start = time.perf_counter()
                finished = self.step()
                self.stats.seconds += time.perf_counter() - start
                self.stats.preemptions = self.batcher.num_preemptions - preemptions
                for seq in finished:
                    unfinished[seq.prompt_index] -= 1
                    if unfinished[seq.prompt_index] == 0:
                        first = seq.prompt_index * params.n
                        yield [self._to_sample(s) for s in seqs[first: first + params.n]]
        except BaseException:  # e.g. KeyboardInterrupt, or the consumer closed the stream: the next call starts clean
            self.batcher.abort_all()
            raise

    def step(self) -> list[Sequence]:
        """One prefill or decode step; the sequences it finished."""
        seqs, is_prefill = self.batcher.schedule()
        if not seqs:
            raise RuntimeError("the batcher made no progress: the KV cache is too small for one sequence")
        if is_prefill:
            computed = [s for s in seqs if s.fork_of is None]
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(len(s) - s.num_computed_tokens for s in computed)
            self.stats.forks += len(seqs) - len(computed)
        else:
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(seqs)
        tokens, logprobs = self.runner.run(seqs, is_prefill)
        finished = []
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            self.block_manager.on_block_filled(seq)  # the KV of all its tokens so far is now written
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            reason = self._finish_reason(seq, token)
            if reason:
                self.batcher.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> str:
        p = seq.params
        if token in p.stop_token_ids:
            return "stop"
        if p.stop_strings:
            tail = self.tokenizer.decode(seq.completion_ids[-(max(map(len, p.stop_strings)) + 8) :])
            if any(s in tail for s in p.stop_strings):
                return "stop"
        if seq.num_completion_tokens >= p.max_new_tokens or len(seq) >= self.max_model_len:
            return "length"
        return ""

    def _to_sample(self, seq: Sequence) -> Sample:
        assert seq.status is Status.FINISHED
        return Sample(
            prompt_index=seq.prompt_index,
            prompt_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.completion_ids,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            text=self.tokenizer.decode(seq.completion_ids, skip_special_tokens=True),
            policy_version=self.policy_version,
        )

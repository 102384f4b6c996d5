"""Owns the model and its KV cache; turns a scheduled step into flat model inputs, runs it, samples.

On a GPU, decode steps run the paged Triton kernel (blocks read in place) and replay CUDA graphs: the
decode forward, the logits and the fused sampling are captured once per batch-size bucket over static
input buffers (`DecodeGraphs`). A decode step is then three host-to-device copies of its inputs (built in
Python), one graph replay instead of hundreds of kernel launches, and the copy of the tokens back. Rows
with top-k / top-p are sampled after the replay, from its logits. Prefill steps run eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from m2flow.rollout.model import AttentionInputs, CausalLM, paged_decode_attention_torch
from m2flow.rollout.sampler import sample, sample_untruncated
from m2flow.rollout.sequence import Sequence


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    a = model.args
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * dtype.itemsize


class DecodeGraphs:
    """One decode step (forward, logits and, given a `sampler`, the sampling of rows without top-k / top-p)
    over static input buffers, padded up to a few batch sizes and replayed as CUDA graphs (one per size,
    captured largest first in one memory pool). Padded rows write their keys and values to a scratch block
    and attend to one token of it. With `capture=False` the same padded step runs eagerly: how the tests
    check the buffers and the padding on a CPU."""

    def __init__(self, model: CausalLM, max_batch: int, max_blocks: int, block_size: int, scratch_block: int,
                 capture: bool, sampler=None):
        self.model, self.capture, self.scratch, self.sampler = model, capture, scratch_block, sampler
        self.max_context = max_blocks * block_size
        self.sizes = sorted({*(s for s in (1, 2, 4, 8) if s < max_batch), *range(16, max_batch, 16), max_batch})
        device = next(model.parameters()).device
        ints = dict(dtype=torch.int64, device=device)
        self.inputs = torch.zeros(len(DECODE_ROWS), max_batch, **ints)  # rows: DECODE_ROWS
        pad = dict(slot_blocks=scratch_block, context_lens=1)  # the scratch block, one token; 0 elsewhere
        self.pad = torch.tensor([pad.get(row, 0) for row in DECODE_ROWS], **ints)[:, None]  # a padded column
        self.temperature = torch.zeros(max_batch, dtype=torch.float32, device=device)  # padded rows: greedy
        self.block_tables = torch.full((max_batch, max_blocks), scratch_block, **ints)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple] = {}
        if capture:
            self._capture()

    def _forward(self, size: int) -> tuple:
        return decode_step(self.model, self.inputs[:, :size], self.block_tables[:size], self.max_context,
                           self.temperature[:size], self.sampler)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up outside the graph (compiles the Triton kernels for this launch)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = pool or graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def run(self, inputs: torch.Tensor, block_tables: torch.Tensor, temperature: torch.Tensor) -> tuple:
        """(logits [B, V] float32, tokens [B] and logprobs [B], or None without a sampler) of one decode step
        for B <= max_batch sequences; `inputs` [len(DECODE_ROWS), B]."""
        b, width = block_tables.shape
        size = next(s for s in self.sizes if s >= b)
        self.inputs[:, :b] = inputs
        self.temperature[:b] = temperature
        # stale entries past a sequence's context are not read by the kernel (masked by the gather path)
        self.block_tables[:b, :width] = block_tables
        if b < size:
            self.inputs[:, b:size] = self.pad
            self.temperature[b:size] = 0.0
            self.block_tables[b:size, 0] = self.scratch
        if self.capture:
            self.graphs[size].replay()
            outputs = self.outputs[size]
        else:
            outputs = self._forward(size)
        return tuple(None if t is None else t[:b] for t in outputs)


# a decode step's int64 inputs, one row each: the model's, then the sampler's (top_k is read outside graphs)
DECODE_ROWS = ("input_ids", "positions", "slot_blocks", "slot_offsets", "context_lens", "seeds", "sample_positions",
               "top_k")


def decode_step(model: CausalLM, inputs: torch.Tensor, block_tables: torch.Tensor, max_context: int,
                temperature: torch.Tensor, sampler=None) -> tuple:
    """One decode step: (logits [B, V] float32, then the sampled tokens [B] and their logprobs [B] if a
    `sampler` (for rows without top-k / top-p) is given, else None, None). `inputs` [len(DECODE_ROWS), B]
    holds each sequence's last token, its position, the cache block and offset its KV goes to, its context
    length (that token included), then the sampler's rows; block_tables [B, M]; temperature [B]."""
    input_ids, positions, slot_blocks, slot_offsets, context_lens, seeds, sample_positions, _ = inputs
    attn = AttentionInputs(slot_blocks, slot_offsets, block_tables, context_lens=context_lens, max_context=max_context)
    logits = model.logits(model(input_ids, positions, attn))
    if sampler is None:
        return logits, None, None
    return logits, *sampler(logits, temperature, seeds, sample_positions)


def compiled(step):
    """`step` (decode_step's signature) through torch.compile, with only the batch and block-table widths
    dynamic (marked, so a changed size does not cost a recompile first): one graph for batch 1, one for
    every other batch size. The KV cache and the weights stay static. Of the guards on the model's modules
    only those on tensors are kept (all of them cost ~200 us a step): the weights and the cache are read
    from the modules at each call (a new cache after sleep/wake is used, which the tests check), and a
    model of another architecture fails the tensor guards and compiles its own graph."""
    compiled_step = torch.compile(step, options=dict(guard_filter_fn=_tensor_guards_for_modules))

    def run(model: CausalLM, inputs: torch.Tensor, block_tables: torch.Tensor, max_context: int,
            temperature: torch.Tensor, sampler=None) -> tuple:
        for tensor, dim in ((inputs, 1), (block_tables, 0), (block_tables, 1), (temperature, 0)):
            if tensor.shape[dim] > 1:
                torch._dynamo.mark_dynamic(tensor, dim)
        # (max_context sizes Triton launches only: a constant here, so it costs no guard)
        return compiled_step(model, inputs, block_tables, 0, temperature, sampler)

    return run


def _tensor_guards_for_modules(guards) -> list[bool]:
    """Of the guards on the model's modules, keeps those on tensors (parameters, buffers, caches: their
    shapes tell one architecture from another) and drops the many type and empty-hook checks."""
    return [not g.name.startswith("model") or g.guard_type == "TENSOR_MATCH" for g in guards]


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, num_blocks: int, max_num_seqs: int = 0,
                 max_model_len: int = 0, triton_kernels: bool = False, static_decode: bool = False,
                 cuda_graphs: bool = False, compile: bool = False):
        """`num_blocks` usable KV blocks (one more, the scratch block, is allocated for padded rows).
        `triton_kernels`: decode attention by the paged Triton kernel instead of gathering blocks, fused
        kernels for residual add + RMSNorm, RoPE + KV-cache store and SwiGLU, and sampling by the fused
        kernel where no row truncates (top-k / top-p). `static_decode`: decode through `DecodeGraphs` (for
        up to `max_num_seqs` sequences of up to `max_model_len` tokens), captured as CUDA graphs with
        `cuda_graphs`. `compile`: the eager decode step (embedding to logits) and untruncated sampling by
        torch.compile (see `compiled`), with decode attention in the form inductor fuses."""
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        if max_model_len:
            model.init_rope(max_model_len)  # the rotary table covers exactly the positions this engine uses
        self.static_decode, self.cuda_graphs = static_decode, cuda_graphs
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.triton_kernels = triton_kernels
        self.fused_sample = None  # rows without top-k / top-p: sampling_kernel.fused_sample, or torch's (compiled)
        if triton_kernels:
            from m2flow.rollout import fused_ops
            from m2flow.rollout.paged_attention import paged_decode_attention
            from m2flow.rollout.sampling_kernel import fused_sample

            model.use_kernels(paged_decode_attention, fused_ops.rms_norm, fused_ops.silu_mul, fused_ops.rope_store)
            self.fused_sample = fused_sample
        else:  # compiled: attention as lookups and sums, which inductor fuses (see the function)
            model.use_kernels(paged_decode_attention_torch if compile else None)
            if compile:  # compiled with the decode step, in the same graph
                self.fused_sample = sample_untruncated
        self.decode = compiled(decode_step) if compile else decode_step
        self.kv_cache: torch.Tensor | None = None
        self.graphs: DecodeGraphs | None = None
        self.allocate_kv()

    def allocate_kv(self) -> None:
        """[2, layers, blocks + 1, H_kv, block_size, D]; each attention layer gets views of its K and V slabs;
        the decode graphs (which hold the cache's and the weights' addresses) are captured again."""
        a = self.model.args
        shape = (2, a.num_layers, self.num_blocks + 1, a.num_kv_heads, self.block_size, a.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        if self.static_decode:
            max_blocks = -(-self.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.max_num_seqs, max_blocks, self.block_size,
                                       scratch_block=self.num_blocks, capture=self.cuda_graphs,
                                       sampler=self.fused_sample)

    def free_kv(self) -> None:
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)
        self.kv_cache = None
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        # numpy converts (nested) Python lists of numbers about twice as fast as torch.tensor
        array = np.array(values, dtype=np.int64 if dtype == torch.int64 else np.float32)
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float]]:
        """Computes the KV of each sequence's uncomputed tokens and samples its next token."""
        params = [s.params for s in seqs]
        sampling = [[p.seed for p in params], [s.num_completion_tokens for s in seqs], [p.top_k for p in params]]
        temperature, top_p = self._tensor([[p.temperature for p in params], [p.top_p for p in params]], torch.float32)
        if is_prefill:
            logits, tokens, logprobs = self._prefill_logits(seqs), None, None
            seeds, positions, top_k = self._tensor(sampling)
        else:
            inputs = self._decode_inputs(seqs, sampling)
            tables = self._block_tables(seqs)
            if self.graphs is not None:  # sampled in the graph, unless some row truncates
                logits, tokens, logprobs = self.graphs.run(inputs, tables, temperature)
            else:
                logits, tokens, logprobs = self.decode(self.model, inputs, tables, max(len(s) for s in seqs),
                                                       temperature, self.fused_sample)
            seeds, positions, top_k = inputs[5:]  # the sampler's rows of DECODE_ROWS
        truncating = any(p.top_k > 0 or p.top_p < 1 for p in params)
        if tokens is None or truncating:
            if self.fused_sample is not None and not truncating:
                tokens, logprobs = self.fused_sample(logits, temperature, seeds, positions)
            else:
                tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, positions)
        for s in seqs:
            s.num_computed_tokens = len(s)
        return tokens.tolist(), logprobs.tolist()

    def _decode_inputs(self, seqs: list[Sequence], sampling: list[list[int]]) -> torch.Tensor:
        """The DECODE_ROWS of a step, built on the host and copied in one transfer."""
        bs = self.block_size
        last = [len(s) - 1 for s in seqs]  # the position of each sequence's newest token
        blocks = [s.block_table[p // bs] for s, p in zip(seqs, last)]
        return self._tensor([[s.token_ids[-1] for s in seqs], last, blocks, [p % bs for p in last],
                             [p + 1 for p in last], *sampling])

    def _prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits at each sequence's last token, computing the KV of its tokens not yet in the cache. A fork
        (`fork_of` set) gets the KV of its partial last block copied from its source and the source's logits."""
        computed = [s for s in seqs if s.fork_of is None]
        logits = self._compute_prefill(computed)
        if len(computed) == len(seqs):
            return logits
        forks = [s for s in seqs if s.fork_of is not None and s.block_table[-1] != s.fork_of.block_table[-1]]
        if forks:
            src, dst = self._tensor([[s.fork_of.block_table[-1] for s in forks], [s.block_table[-1] for s in forks]])
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        row = {id(s): i for i, s in enumerate(computed)}
        return logits[self._tensor([row[id(s.fork_of or s)] for s in seqs])]

    def _compute_prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits at each sequence's last token, computing the KV of its tokens not yet in the cache."""
        lengths = self._tensor([len(s) for s in seqs])
        tables = self._block_tables(seqs)
        context = torch.arange(tables.shape[1] * self.block_size, device=self.device)
        starts = self._tensor([s.num_computed_tokens for s in seqs])
        input_ids = self._tensor([t for s in seqs for t in s.token_ids[s.num_computed_tokens :]])
        new = lengths - starts  # tokens to compute per sequence
        q_offset = torch.arange(int(new.max()), device=self.device)
        q_valid = q_offset[None, :] < new[:, None]
        first = torch.cumsum(new, 0) - new  # flat index of each sequence's first new token
        query_index = torch.where(q_valid, first[:, None] + q_offset[None, :], -1)
        q_pos = torch.where(q_valid, starts[:, None] + q_offset[None, :], 0)  # [B, Q]; padding at 0
        positions = q_pos[q_valid]
        slot_blocks = tables.gather(1, q_pos // self.block_size)[q_valid]
        slot_offsets = (q_pos % self.block_size)[q_valid]
        allowed = context[None, None, :] <= q_pos[:, :, None]  # causal
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
        attn = AttentionInputs(slot_blocks, slot_offsets, tables, query_index, mask)
        hidden = self.model(input_ids, positions, attn)[first + new - 1]  # each sequence's last token
        return self.model.logits(hidden)

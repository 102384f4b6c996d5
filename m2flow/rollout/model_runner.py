"""Owns the model and its KV cache; turns a scheduled step into flat model inputs, runs it, samples."""

from __future__ import annotations

import torch

from m2flow.rollout.model import AttentionInputs, CausalLM
from m2flow.rollout.sampler import sample
from m2flow.rollout.sequence import Sequence


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    a = model.args
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, num_blocks: int):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_cache: torch.Tensor | None = None
        self.allocate_kv()

    def allocate_kv(self) -> None:
        """[2, layers, blocks, H_kv, block_size, D]; each attention layer gets views of its K and V slabs."""
        a = self.model.args
        shape = (2, a.num_layers, self.num_blocks, a.num_kv_heads, self.block_size, a.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def free_kv(self) -> None:
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)
        self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cache block, offset in it) of each (sequence b, position positions[b, i]): [B, Q] -> 2 x [B, Q]."""
        return tables.gather(1, positions // self.block_size), positions % self.block_size

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float]]:
        """Computes the KV of each sequence's uncomputed tokens and samples its next token."""
        lengths = self._tensor([len(s) for s in seqs])
        tables = self._block_tables(seqs)
        context = torch.arange(tables.shape[1] * self.block_size, device=self.device)
        if is_prefill:
            starts = self._tensor([s.num_computed_tokens for s in seqs])
            input_ids = self._tensor([t for s in seqs for t in s.token_ids[s.num_computed_tokens :]])
            new = lengths - starts  # tokens to compute per sequence
            q_offset = torch.arange(int(new.max()), device=self.device)
            q_valid = q_offset[None, :] < new[:, None]
            first = torch.cumsum(new, 0) - new  # flat index of each sequence's first new token
            query_index = torch.where(q_valid, first[:, None] + q_offset[None, :], -1)
            q_pos = torch.where(q_valid, starts[:, None] + q_offset[None, :], 0)  # [B, Q]; padding at 0
            positions = q_pos[q_valid]
            slot_blocks, slot_offsets = (t[q_valid] for t in self._slots(tables, q_pos))
            allowed = context[None, None, :] <= q_pos[:, :, None]  # causal
            last = first + new - 1
        else:
            positions = lengths - 1
            input_ids = self._tensor([s.token_ids[-1] for s in seqs])
            slot_blocks, slot_offsets = (t.squeeze(1) for t in self._slots(tables, positions[:, None]))
            query_index = None
            allowed = (context[None, :] < lengths[:, None])[:, None]  # [B, 1, K]
            last = None
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
        attn = AttentionInputs(slot_blocks, slot_offsets, tables, query_index, mask)
        hidden = self.model(input_ids, positions, attn)
        logits = self.model.logits(hidden if last is None else hidden[last])
        params = [s.params for s in seqs]
        tokens, logprobs = sample(
            logits,
            temperature=self._tensor([p.temperature for p in params], torch.float32),
            top_k=self._tensor([p.top_k for p in params]),
            top_p=self._tensor([p.top_p for p in params], torch.float32),
            seeds=self._tensor([p.seed for p in params]),
            positions=self._tensor([s.num_completion_tokens for s in seqs]),
        )
        for s in seqs:
            s.num_computed_tokens = len(s)
        return tokens.tolist(), logprobs.tolist()

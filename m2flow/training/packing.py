"""Sequence packing for the trainer's forward passes (train.max_tokens_per_microbatch).

A RolloutBatch row is [left padding | prompt | response | right padding]; computed as is, every padding token
costs as much as a real one. Packed, a micro-batch is one row of the real tokens of its sequences back to back
(`pack`), with position ids that restart at 0 for each sequence, and attention that never crosses a sequence
boundary (`varlen_attention`): on CUDA, PyTorch's variable-length flash attention; elsewhere, the packed
queries, keys and values are laid out per sequence (right-padded, so causal attention never sees a pad key)
for one causal SDPA call, and gathered back. Only the projections and MLPs see the packed row, so no padding
token goes through them, and only the positions that predict response tokens go through the LM head.

The model must use the attention implementation `m2flow_varlen` (`use_varlen_attention(model)`), which
behaves exactly like `sdpa` on ordinary (padded) calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VARLEN = "m2flow_varlen"


@dataclass
class Packed:
    input_ids: torch.Tensor  # [1, N] the real tokens of every sequence, one after the other
    position_ids: torch.Tensor  # [1, N] 0.. per sequence
    cu_seqlens: torch.Tensor  # [S+1] int32, where each sequence starts in the packed row (and N at the end)
    max_len: int  # the longest sequence
    keep: torch.Tensor  # [K] packed positions whose logits predict a response token (sorted)
    slot: torch.Tensor  # [S, T] index into `keep` of the logits that predict response column t (-1: none)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> Packed:
    """Packs rows laid out as [pad | prompt | response | pad] (a RolloutBatch's input_ids and attention_mask,
    the last `response_len` columns being the response columns)."""
    real = attention_mask.bool()
    lengths = real.sum(1)
    n = int(lengths.sum())
    flat = torch.full(real.shape, -1, dtype=torch.long)
    flat[real] = torch.arange(n)  # packed position of every real token (rows are contiguous runs)
    starts = torch.cumsum(lengths, 0) - lengths
    position_ids = torch.arange(n) - torch.repeat_interleave(starts, lengths)
    width = input_ids.shape[1]
    source = flat[:, width - response_len - 1: width - 1]  # the position before each response column
    target_real = real[:, width - response_len:]
    source = torch.where(target_real & (source >= 0), source, -1)
    keep = source[source >= 0].unique(sorted=True)
    slot = torch.full_like(source, -1)
    slot[source >= 0] = torch.searchsorted(keep, source[source >= 0])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return Packed(input_ids[real].unsqueeze(0), position_ids.unsqueeze(0), cu, int(lengths.max()), keep, slot)


def packed_response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_len: int) -> torch.Tensor:
    """`forward.response_logits` computed on the packed sequences: [B, T, V] float32, the logits that predict
    each response token (0 where a row has no response token in that column)."""
    p = pack(input_ids, attention_mask, response_len)
    logits = packed_forward(model, p)[0].float()  # [K, V]
    gathered = logits[p.slot.clamp(min=0).to(logits.device)]  # [B, T, V]
    return gathered * (p.slot >= 0).to(logits.device).unsqueeze(-1)


def packed_forward(model, p: Packed) -> torch.Tensor:
    """The model's LM-head output ([1, K, ...]) at the packed positions `p.keep`."""
    return model(input_ids=p.input_ids, position_ids=p.position_ids,
                 attention_mask={"full_attention": None, "sliding_attention": None},  # no dense mask is built
                 use_cache=False, logits_to_keep=p.keep.to(p.input_ids.device),
                 cu_seq_lens_q=p.cu_seqlens, cu_seq_lens_k=p.cu_seqlens, max_length_q=p.max_len,
                 max_length_k=p.max_len).logits


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for transformers models ([1, H, N, D] query, [1, KVH, N, D] key / value): per sequence of
    `cu_seq_lens_q` when given (packed), else transformers' SDPA attention unchanged. Returns ([1, N, H, D],
    None) as transformers expects."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got a batch of {query.shape[0]}")
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [N, heads, D]
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        cu = cu.to(q.device)
        max_len = int(kwargs["max_length_q"])
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = _padded_causal_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def _padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                             scaling: float | None) -> torch.Tensor:
    """Causal attention within each sequence of packed q, k, v ([N, heads, D]): one SDPA call over the
    sequences laid out right-padded ([S, heads, L, D]); a real query never attends to a later position, so
    never to padding. Returns [N, H, D]."""
    lengths = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(q.shape[0]) - torch.repeat_interleave(cu[:-1].long(), lengths)
    max_len = int(lengths.max())

    def lay_out(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(len(lengths), max_len, x.shape[1], x.shape[2])
        padded = padded.index_put((seq, pos), x)
        return padded.transpose(1, 2)  # [S, heads, L, D]

    out = torch.nn.functional.scaled_dot_product_attention(
        lay_out(q), lay_out(k), lay_out(v), is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)[seq, pos]  # [N, H, D]


def token_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `budget` tokens (first-fit decreasing: few, balanced bins; a row
    longer than the budget gets a bin of its own). Each bin lists its rows in ascending order."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def micro_batches(batch, micro_batch_size: int, max_tokens: int = 0) -> list[tuple[torch.Tensor, object]]:
    """(row indices, RolloutBatch of those rows) for each micro-batch: consecutive rows of `micro_batch_size`,
    or with `max_tokens` > 0 packed bins of whole sequences of at most `max_tokens` real tokens."""
    if max_tokens <= 0:
        return [(torch.arange(i, min(i + micro_batch_size, len(batch))), mb)
                for i, mb in zip(range(0, len(batch), micro_batch_size), batch.split(micro_batch_size))]
    lengths = batch.attention_mask.sum(1).tolist()
    out = []
    for rows in token_bins(lengths, max_tokens):
        index = torch.tensor(rows, dtype=torch.long)
        out.append((index, batch.select(index)))
    return out


def use_varlen_attention(model) -> None:
    """Registers `m2flow_varlen` with transformers (once) and switches `model` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    model.set_attn_implementation(VARLEN)

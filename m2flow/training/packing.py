"""Sequence packing for the trainer's forward passes (train.max_tokens_per_microbatch).

A RolloutBatch row is [left padding | prompt | response | right padding]; computed as is, every padding token
costs as much as a real one. Packed, a micro-batch is one row of the real tokens of its sequences back to back
(`pack`), with position ids that restart at 0 for each sequence, and attention that never crosses a sequence
boundary (`varlen_attention`). The samples of one prompt share a single copy of it: the prompt's tokens go
through the model once, and each sample's response attends to that copy (one step of the demo, 64 groups of
8 samples: 15,035 tokens instead of 31,912). Attention lays the packed queries, keys and values out per sequence
(right-padded, so causal attention never sees a pad key; a shared prompt copied into each of its sequences) for
one causal SDPA call, and gathers each token's output back; on CUDA, when nothing is shared, PyTorch's
variable-length flash attention runs instead. Only the projections and MLPs see the packed row, so no padding
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
    input_ids: torch.Tensor  # [1, N] the real tokens of every sequence, a shared prompt once
    position_ids: torch.Tensor  # [1, N] each token's position in its sequence
    layout: torch.Tensor  # [S, L] packed position of each sequence's t-th token (0 past its end)
    owner: tuple[torch.Tensor, torch.Tensor]  # ([N], [N]) the (sequence, t) whose attention output each token takes
    cu_seqlens: torch.Tensor | None  # [S+1] int32 sequence starts when every sequence is one contiguous run, else None
    max_len: int  # the longest sequence
    keep: torch.Tensor  # [K] packed positions whose logits predict a response token (a shared last prompt token
    #                     appears once per sequence)
    targets: torch.Tensor  # [K] the response token each kept position predicts
    slot: torch.Tensor  # [S, T] index into `keep` of the logits that predict response column t (-1: none)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
         share_prompts: bool = True) -> Packed:
    """Packs rows laid out as [pad | prompt | response | pad] (a RolloutBatch's input_ids and attention_mask,
    the last `response_len` columns being the response columns). With `share_prompts`, rows with the same
    prompt tokens (the samples of a GRPO group) share one copy of it: its tokens are computed once and every
    row's response attends to that copy, which is exactly what each row computes alone."""
    device, input_ids = input_ids.device, input_ids.cpu()  # the layout is worked out on the host
    B, width = input_ids.shape
    P = width - response_len
    real = attention_mask.bool().cpu()
    rows = torch.arange(B)
    if share_prompts:  # the first row with each prompt (its tokens and length) holds the copy
        prompts = torch.where(real[:, :P], input_ids[:, :P], -1)
        _, group = torch.unique(prompts, dim=0, return_inverse=True)
        holder = torch.full((int(group.max()) + 1,), B).scatter_reduce(0, group, rows, "amin")[group]
    else:
        holder = rows
    is_prompt = torch.arange(width) < P
    own = real & (~is_prompt | (holder == rows)[:, None])  # the tokens each row brings to the packed row
    n = int(own.sum())
    index = torch.full((B, width), -1, dtype=torch.long)  # packed position of every real (row, column)
    index[own] = torch.arange(n)
    index = torch.where(real & is_prompt, index[holder], index)  # a shared prompt: its holder's copy
    flat_ids = torch.empty(n, dtype=input_ids.dtype)
    flat_ids[index[own]] = input_ids[own]
    in_seq = real.long().cumsum(1) - 1  # each real token's position in its row's sequence
    position_ids = torch.empty(n, dtype=torch.long)
    position_ids[index[own]] = in_seq[own]
    owner_seq, owner_t = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    owner_seq[index[own]] = rows[:, None].expand(B, width)[own]
    owner_t[index[own]] = in_seq[own]
    lengths = real.sum(1)
    L = int(lengths.max())
    t = torch.arange(L)
    columns = ((width - response_len - real[:, :P].sum(1))[:, None] + t).clamp(max=width - 1)
    layout = torch.where(t < lengths[:, None], index.gather(1, columns), 0)  # [S, L] each row's tokens in order
    # response column t of row i is predicted by the token before it in the row's sequence
    target_real = real[:, P:]
    source = index[:, P - 1: width - 1]  # the position before each response column (a shared one for column 0)
    source = torch.where(target_real & (source >= 0), source, -1)
    has = source >= 0
    keep = source[has]
    slot = torch.full_like(source, -1)
    slot[has] = torch.arange(len(keep))
    cu = None
    if bool((holder == rows).all()):  # nothing shared: each sequence is one run
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
    return Packed(flat_ids.unsqueeze(0).to(device), position_ids.unsqueeze(0).to(device), layout,
                  (owner_seq, owner_t), cu, L, keep, input_ids[:, P:][has], slot)


def packed_response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_len: int, share_prompts: bool = True) -> torch.Tensor:
    """`forward.response_logits` computed on the packed sequences: [B, T, V] float32, the logits that predict
    each response token (0 where a row has no response token in that column)."""
    p = pack(input_ids, attention_mask, response_len, share_prompts)
    logits = packed_forward(model, p)[0].float()  # [K, V]
    gathered = logits[p.slot.clamp(min=0).to(logits.device)]  # [B, T, V]
    return gathered * (p.slot >= 0).to(logits.device).unsqueeze(-1)


def packed_forward(model, p: Packed) -> torch.Tensor:
    """The model's LM-head output ([1, K, ...]) at the packed positions `p.keep`."""
    device = p.input_ids.device
    varlen = {}
    if p.cu_seqlens is not None:
        varlen = dict(cu_seq_lens_q=p.cu_seqlens, cu_seq_lens_k=p.cu_seqlens, max_length_q=p.max_len,
                      max_length_k=p.max_len)
    return model(input_ids=p.input_ids, position_ids=p.position_ids,
                 attention_mask={"full_attention": None, "sliding_attention": None},  # no dense mask is built
                 use_cache=False, logits_to_keep=p.keep.to(device), packed_layout=p, **varlen).logits


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for transformers models ([1, H, N, D] query, [1, KVH, N, D] key / value): per sequence of
    the `packed_layout` when given (packed), else transformers' SDPA attention unchanged. Returns ([1, N, H, D],
    None) as transformers expects."""
    p: Packed | None = kwargs.get("packed_layout")
    if p is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got a batch of {query.shape[0]}")
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [N, heads, D]
    if q.is_cuda and p.cu_seqlens is not None:
        from torch.nn.attention.varlen import varlen_attn

        cu = p.cu_seqlens.to(q.device)
        out = varlen_attn(q, k, v, cu, cu, p.max_len, p.max_len, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = _laid_out_causal_attention(q, k, v, p, scaling)
    return out.unsqueeze(0), None


def _laid_out_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packed,
                               scaling: float | None) -> torch.Tensor:
    """Causal attention within each sequence of packed q, k, v ([N, heads, D]): one SDPA call over the
    sequences gathered right-padded ([S, heads, L, D], a shared prompt copied into each of its sequences); a
    real query never attends to a later position, so never to padding. Each token takes its owner's output
    (the gradients of a shared token's copies add up). Returns [N, H, D]."""
    S, L = p.layout.shape
    layout = p.layout.reshape(-1).to(q.device)

    def lay_out(x: torch.Tensor) -> torch.Tensor:  # (index_select: its backward is a fast index_add)
        return x.index_select(0, layout).view(S, L, *x.shape[1:]).transpose(1, 2)  # [S, heads, L, D]

    out = torch.nn.functional.scaled_dot_product_attention(
        lay_out(q), lay_out(k), lay_out(v), is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    seq, t = (x.to(q.device) for x in p.owner)
    return out.transpose(1, 2).reshape(S * L, *out.shape[1:2], -1).index_select(0, seq * L + t)  # [N, H, D]


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


def micro_batches(batch, micro_batch_size: int, max_tokens: int = 0,
                  share_prompts: bool = True) -> list[tuple[torch.Tensor, object]]:
    """(row indices, RolloutBatch of those rows) for each micro-batch: consecutive rows of `micro_batch_size`,
    or with `max_tokens` > 0 packed bins of at most `max_tokens` real tokens. With `share_prompts` a bin
    takes the samples of a prompt together (one `group_ids` value), counting the prompt once as `pack`
    computes it; a group larger than the budget is binned row by row."""
    if max_tokens <= 0:
        return [(torch.arange(i, min(i + micro_batch_size, len(batch))), mb)
                for i, mb in zip(range(0, len(batch), micro_batch_size), batch.split(micro_batch_size))]
    prompt = batch.attention_mask[:, :batch.prompt_width].sum(1).tolist()
    response = batch.attention_mask[:, batch.prompt_width:].sum(1).tolist()
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(batch.group_ids.tolist() if share_prompts else range(len(batch))):
        groups.setdefault(g, []).append(i)
    units, weights = [], []
    for rows in groups.values():
        shared = max(prompt[i] for i in rows) + sum(response[i] for i in rows)
        for unit in [rows] if shared <= max_tokens else [[i] for i in rows]:
            units.append(unit)
            weights.append(max(prompt[i] for i in unit) + sum(response[i] for i in unit))
    out = []
    for bin_units in token_bins(weights, max_tokens):
        index = torch.tensor(sorted(i for u in bin_units for i in units[u]), dtype=torch.long)
        out.append((index, batch.select(index)))
    return out


def use_varlen_attention(model) -> None:
    """Registers `m2flow_varlen` with transformers (once) and switches `model` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    model.set_attn_implementation(VARLEN)

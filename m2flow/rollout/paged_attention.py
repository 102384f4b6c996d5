"""Decode attention that reads the block KV cache in place: a Triton kernel (flash-decoding).

One program per (sequence, KV head, context split). A program loads the G query heads that share its KV
head, walks its share of the sequence's context a tile of tokens at a time (each token's block looked up in
the block table, so keys and values are never gathered into a copy), and keeps an online softmax in float32.
Splitting the context lets a few long sequences (batch 1) still fill the GPU: each sequence's actual
context is divided among the splits in the kernel, and a second kernel merges the splits by their
log-sum-exp (with one split the first kernel writes the result). It runs on GPUs; on CPU only in Triton's
interpreter (``TRITON_INTERPRET=1``), where the tests check it against attention over each sequence's
gathered context.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TILE = 32  # context tokens per loop iteration (sm_90, 4 warps: 186 registers, no spills; 64 spills)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr, scale,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_tb, stride_ob, stride_oh,
                   stride_os, stride_lb, stride_lh,
                   GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    b, h_kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens_ptr + b)
    g, d = tl.arange(0, GROUP_P), tl.arange(0, DIM_P)
    g_ok, d_ok = g < GROUP, d < HEAD_DIM
    heads = h_kv * GROUP + g  # query heads h_kv * G ... h_kv * G + G - 1 share KV head h_kv
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0)
    q = (q.to(tl.float32) * scale).to(DOT_DTYPE)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([GROUP_P], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)  # running sum of exp(score - m) * value
    # this sequence's context in equal parts (whole tiles), one per split: balanced whatever its length
    split_len = tl.cdiv(tl.cdiv(length, tl.num_programs(2)), TILE) * TILE
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    for t0 in range(start, end, TILE):
        t = t0 + tl.arange(0, TILE)
        t_ok = t < end
        block = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0)
        offsets = block[:, None] * stride_kb + h_kv * stride_kh + (t % BLOCK_SIZE)[:, None] * stride_kt + d[None, :]
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offsets, mask=kv_ok, other=0.0).to(DOT_DTYPE)  # [TILE, DIM_P]
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [GROUP_P, TILE], float32
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: t0 < end, so the tile has a valid token
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_ptr + offsets, mask=kv_ok, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    has = l > 0  # an empty split (past the end of the context) contributes nothing
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out,
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, splits, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                  stride_ob, stride_oh, HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr, SPLITS_P: tl.constexpr):
    """Weights each split's output by its share of the softmax mass: exp(lse_s - logsumexp)."""
    b, h = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, SPLITS_P), tl.arange(0, DIM_P)
    s_ok, d_ok = s < splits, d < HEAD_DIM
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    merged = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, merged, mask=d_ok)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_dtype(cache_dtype: torch.dtype):
    """The dtype of the two matmuls' inputs: the cache's (tensor cores for bf16 / fp16), except in Triton's
    interpreter, whose bf16 matmul is wrong (it multiplies the raw bits): float32 there."""
    return tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else _TL_DTYPES[cache_dtype]


def num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Context splits per (sequence, KV head): enough programs to fill the GPU twice over, no split shorter
    than a tile."""
    programs = 2 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1)
    wanted = -(-programs // (batch * num_kv_heads))
    return max(1, min(wanted, -(-max_context // TILE)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, max_context: int,
                           splits: int | None = None) -> torch.Tensor:
    """q [B, H, D] (one query per sequence); k_cache, v_cache [num_blocks, H_kv, block_size, D];
    block_tables [B, M] (each sequence's blocks in position order); context_lens [B] (1 <= len <=
    `max_context` <= M * block_size) -> [B, H, D] in q's dtype: softmax(q k^T / sqrt(D)) v over each
    sequence's first context_lens tokens. The number of splits depends only on B and `max_context` (a
    Python int), so the launch has the same shape for every step (what a CUDA graph needs); each sequence's
    own length is divided among them in the kernel."""
    b, h, d = q.shape
    _, h_kv, block_size, _ = k_cache.shape
    group = h // h_kv
    splits = splits or num_splits(b, h_kv, max_context, q.device)
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    # one split writes its result directly; several write float32 parts, merged by a second kernel
    part = out[:, :, None] if splits == 1 else torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    assert block_tables.stride(-1) == 1
    _decode_kernel[(b, h_kv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, d**-0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, DIM_P=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=block_size, TILE=TILE, DOT_DTYPE=_dot_dtype(k_cache.dtype),
    )
    if splits > 1:
        _merge_kernel[(b, h)](part, lse, out, splits, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
                              lse.stride(1), out.stride(0), out.stride(1), HEAD_DIM=d,
                              DIM_P=triton.next_power_of_2(d), SPLITS_P=max(2, triton.next_power_of_2(splits)))
    return out

"""A decoder layer's elementwise steps, each fused into one Triton kernel (used on GPUs).

At small decode batches a step's time goes to launching kernels rather than to moving bytes: in PyTorch
a residual add and an RMSNorm are five kernels, RoPE five and the KV-cache store two more, SwiGLU's
activation two, for every layer. These kernels do each group in one launch and round to the model's dtype
exactly where the PyTorch code does, so in float32 they agree to rounding and in bf16 they follow
transformers' order of operations:

- `rms_norm`: (the residual added and rounded first, when given) normalise in float32, round to the input
  dtype, multiply by the weight (round again);
- `silu_mul`: silu(gate) rounded, times up, rounded;
- `rope_store`: x * cos and rotate_half(x) * sin rounded each, then their sum rounded, for the query and
  key heads; the rotated keys and the values are written straight into their KV-cache slots.

GPU only; the tests run them in Triton's interpreter against the PyTorch code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_res, stride_out, stride_sum, dim,
                     eps, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    ok = i < dim
    x = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:  # x + residual, rounded to the dtype (as the PyTorch add), kept for the next residual
        x += tl.load(res_ptr + row * stride_res + i, mask=ok, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + i, x, mask=ok)
        x = x.to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded before the weight, as transformers
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + i, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, width, BLOCK: tl.constexpr):
    row, col = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < width
    gate = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + col, mask=ok, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + col, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_store_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, blocks_ptr, offsets_ptr,
                       stride_n, stride_cn, stride_qn, stride_cb, stride_ch, stride_ct, HEADS: tl.constexpr,
                       KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token n, head h) of qkv [N, HEADS + 2 * KV_HEADS, D]: query heads go to q [N, HEADS, D],
    key heads (rotated) and value heads (as they are) to their slot of the caches [blocks, KV_HEADS,
    block_size, D]."""
    n, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, BLOCK)
    ok = d < 2 * HALF
    head = qkv_ptr + n * stride_n + h * 2 * HALF
    x = tl.load(head + d, mask=ok, other=0.0)
    slot = tl.load(blocks_ptr + n) * stride_cb + tl.load(offsets_ptr + n) * stride_ct
    kv_head = h - HEADS  # < 0: a query head; >= KV_HEADS: a value head
    if kv_head >= KV_HEADS:
        tl.store(v_cache_ptr + slot + (kv_head - KV_HEADS) * stride_ch + d, x, mask=ok)
    else:
        first = d < HALF
        partner = tl.load(head + tl.where(first, d + HALF, d - HALF), mask=ok, other=0.0).to(tl.float32)
        rotated = tl.where(first, -partner, partner)  # rotate_half: (-x2, x1)
        cos = tl.load(cos_ptr + n * stride_cn + d, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + n * stride_cn + d, mask=ok, other=0.0).to(tl.float32)
        dtype = q_ptr.dtype.element_ty
        a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
        b = (rotated * sin).to(dtype).to(tl.float32)
        out = (a + b).to(dtype)
        if kv_head < 0:
            tl.store(q_ptr + n * stride_qn + h * 2 * HALF + d, out, mask=ok)
        else:
            tl.store(k_cache_ptr + slot + kv_head * stride_ch + d, out, mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [N, H] -> weight * normalised x, in x's dtype; with `residual`: (that of x + residual, x + residual)."""
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](x, res, weight, out, summed, x.stride(0), res.stride(0), out.stride(0),
                                    summed.stride(0), x.shape[1], eps, RESIDUAL=residual is not None,
                                    BLOCK=triton.next_power_of_2(x.shape[1]))
    return out if residual is None else (out, summed)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate then up) -> silu(gate) * up [N, I]."""
    n, width = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(-1) == 1
    out = torch.empty(n, width, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    _silu_mul_kernel[(n, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block)
    return out


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> torch.Tensor:
    """qkv [N, num_heads + 2 * H_kv, D] (rows contiguous); cos, sin [N, 1, D] (halves repeated) -> the rotated
    queries [N, num_heads, D]. Each token's rotated key and its value go to (slot_blocks[n], :,
    slot_offsets[n]) of the caches [blocks, H_kv, block_size, D]."""
    n, heads, d = qkv.shape
    assert qkv.stride(2) == 1 and qkv.stride(1) == d and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and k_cache.dtype == qkv.dtype
    q = torch.empty(n, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(n, heads)](qkv, cos, sin, q, k_cache, v_cache, slot_blocks, slot_offsets, qkv.stride(0),
                                   cos.stride(0), q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                   HEADS=num_heads, KV_HEADS=(heads - num_heads) // 2, HALF=d // 2,
                                   BLOCK=triton.next_power_of_2(d))
    return q

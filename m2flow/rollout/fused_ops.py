"""A decoder layer's elementwise steps, each fused into one Triton kernel (used on GPUs).

At small decode batches a step's time goes to launching kernels rather than to moving bytes: in PyTorch
an RMSNorm is four kernels, RoPE five and SwiGLU's activation two, for every layer. These kernels do
each in one launch and round to the model's dtype exactly where the PyTorch code does, so in float32 they
agree to rounding and in bf16 they follow transformers' order of operations:

- `rms_norm`: normalise in float32, round to the input dtype, multiply by the weight (round again);
- `silu_mul`: silu(gate) rounded, times up, rounded;
- `rope`: x * cos and rotate_half(x) * sin rounded each, then their sum rounded.

GPU only; the tests run them in Triton's interpreter against the PyTorch code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    ok = i < dim
    x = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0).to(tl.float32)
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
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xn, stride_xh, stride_cn, stride_on, stride_oh,
                 HALF: tl.constexpr, BLOCK: tl.constexpr):
    n, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, BLOCK)
    ok = d < 2 * HALF
    first = d < HALF
    x = tl.load(x_ptr + n * stride_xn + h * stride_xh + d, mask=ok, other=0.0).to(tl.float32)
    partner = tl.load(x_ptr + n * stride_xn + h * stride_xh + tl.where(first, d + HALF, d - HALF), mask=ok,
                      other=0.0).to(tl.float32)
    rotated = tl.where(first, -partner, partner)  # rotate_half: (-x2, x1)
    cos = tl.load(cos_ptr + n * stride_cn + d, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + n * stride_cn + d, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    a = (x * cos).to(dtype).to(tl.float32)
    b = (rotated * sin).to(dtype).to(tl.float32)
    tl.store(out_ptr + n * stride_on + h * stride_oh + d, (a + b).to(dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] -> weight * normalised x, in x's dtype."""
    assert x.stride(-1) == 1
    out = torch.empty_like(x)
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.stride(0), out.stride(0), x.shape[1], eps,
                                    BLOCK=triton.next_power_of_2(x.shape[1]))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate then up) -> silu(gate) * up [N, I]."""
    n, width = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(-1) == 1
    out = torch.empty(n, width, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    _silu_mul_kernel[(n, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; cos, sin [N, 1, D] (halves repeated) -> x rotated (pairs split at D / 2)."""
    n, heads, d = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    out = torch.empty(n, heads, d, dtype=x.dtype, device=x.device)
    _rope_kernel[(n, heads)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
                             HALF=d // 2, BLOCK=triton.next_power_of_2(d))
    return out

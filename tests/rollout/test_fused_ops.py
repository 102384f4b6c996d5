"""The fused elementwise kernels against the engine's PyTorch code (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2flow.rollout import fused_ops
from m2flow.rollout.model import RMSNorm, apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: within 1 ulp on a GPU; the interpreter rounds float32 -> bf16 in registers differently from torch
# (a few ulp apart after two roundings), so it gets 4 ulp. float32: rounding only.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-6, rtol=2**-7 if DEVICE == "cuda" else 2**-5)}


def _x(*shape, dtype, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 96])  # a power of two and not
def test_rms_norm(dtype, dim):
    norm = RMSNorm(dim, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(_x(dim, dtype=dtype, seed=1))
    x = _x(7, dim, dtype=dtype)
    expected = norm(x)
    got = fused_ops.rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gate_up = _x(5, 2 * 1500, dtype=dtype)  # two column blocks, the second partial
    gate, up = gate_up.chunk(2, dim=-1)
    got = fused_ops.silu_mul(gate_up)
    assert got.shape == (5, 1500)
    torch.testing.assert_close(got, F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope(dtype):
    n, heads, d = 6, 5, 16
    qkv = _x(n, heads + 3, d, dtype=dtype)
    x = qkv[:, :heads]  # a strided view, as the attention layer passes it
    angles = torch.arange(n, device=DEVICE)[:, None].float() * torch.linspace(0.1, 1.0, d // 2, device=DEVICE)
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    got = fused_ops.rope(x, cos, sin)
    tol = dict(TOL[dtype])
    tol["atol"] = max(tol["atol"], tol["rtol"] * x.abs().max().item())  # a sum of two rounded products can cancel
    torch.testing.assert_close(got, apply_rope(x, cos, sin), **tol)

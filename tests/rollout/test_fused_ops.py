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
def test_rms_norm_adds_the_residual_first(dtype):
    dim = 96
    norm = RMSNorm(dim, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(_x(dim, dtype=dtype, seed=1))
    x, residual = _x(7, dim, dtype=dtype), _x(7, dim, dtype=dtype, seed=2)
    before = residual.clone()
    expected_sum = x + residual
    got, got_sum = fused_ops.rms_norm(x, norm.weight, 1e-6, residual)
    if dtype == torch.float32 or DEVICE == "cuda":
        assert torch.equal(got_sum, expected_sum)  # one rounding of an exact float32 sum, as torch's add
    else:  # the interpreter's float32 -> bf16 rounding: within 1 ulp
        torch.testing.assert_close(got_sum, expected_sum, atol=0, rtol=2**-7)
    torch.testing.assert_close(got, norm(expected_sum), **TOL[dtype])
    assert torch.equal(norm(x, residual)[1], expected_sum) and torch.equal(residual, before)  # no input written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gate_up = _x(5, 2 * 1500, dtype=dtype)  # two column blocks, the second partial
    gate, up = gate_up.chunk(2, dim=-1)
    got = fused_ops.silu_mul(gate_up)
    assert got.shape == (5, 1500)
    torch.testing.assert_close(got, F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store(dtype):
    """Queries rotated into a new tensor; keys rotated and values copied into their cache slots, other slots
    untouched; the same values as apply_rope + the PyTorch store."""
    n, heads, kv_heads, d, block_size = 6, 4, 2, 16, 4
    qkv = _x(n, heads + 2 * kv_heads, d, dtype=dtype)
    angles = torch.arange(n, device=DEVICE)[:, None].float() * torch.linspace(0.1, 1.0, d // 2, device=DEVICE)
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    k_cache, v_cache = (_x(5, kv_heads, block_size, d, dtype=dtype, seed=s) for s in (3, 4))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    blocks = torch.tensor([2, 2, 0, 4, 4, 1], device=DEVICE)
    offsets = torch.tensor([0, 3, 1, 2, 0, 3], device=DEVICE)
    qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin)
    expected_k[blocks, :, offsets] = qk[:, heads:]
    expected_v[blocks, :, offsets] = qkv[:, heads + kv_heads :]
    q = fused_ops.rope_store(qkv, cos, sin, heads, k_cache, v_cache, blocks, offsets)
    tol = dict(TOL[dtype])
    tol["atol"] = max(tol["atol"], tol["rtol"] * qkv.abs().max().item())  # a sum of two rounded products can cancel
    assert q.shape == (n, heads, d)
    torch.testing.assert_close(q, qk[:, :heads], **tol)
    torch.testing.assert_close(k_cache, expected_k, **tol)
    assert torch.equal(v_cache, expected_v)  # copied as they are
    untouched = torch.ones(5, block_size, dtype=torch.bool, device=DEVICE)
    untouched[blocks, offsets] = False
    assert torch.equal(k_cache.transpose(1, 2)[untouched], expected_k.transpose(1, 2)[untouched])

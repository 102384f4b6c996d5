"""The Triton paged decode-attention kernel against plain attention over each sequence's gathered context.

On a CPU machine the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
on a GPU, compiled."""

from __future__ import annotations

import pytest
import torch

from m2flow.rollout.model import paged_decode_attention_torch
from m2flow.rollout.paged_attention import TILE, num_splits, paged_decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_cache, v_cache, tables, lengths):
    """softmax(q k^T / sqrt(D)) v per sequence, over its context gathered token by token; GQA by repeating
    each KV head for its G query heads (as transformers does)."""
    b, h, d = q.shape
    h_kv, bs = k_cache.shape[1], k_cache.shape[2]
    out = []
    for i in range(b):
        n = int(lengths[i])
        pos = torch.arange(n, device=q.device)
        blocks = tables[i, pos // bs]
        keys = k_cache[blocks, :, pos % bs].float().repeat_interleave(h // h_kv, dim=1)  # [n, H, D]
        values = v_cache[blocks, :, pos % bs].float().repeat_interleave(h // h_kv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), keys) * d**-0.5
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(out)


def make_case(lengths, heads=4, kv_heads=2, dim=16, block_size=16, num_blocks=128, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    width = -(-max(lengths) // block_size) + 2  # padded tables, as the runner builds them
    tables = torch.randperm(num_blocks, generator=gen)[: b * width].view(b, width)  # blocks scattered in the cache
    q = torch.randn(b, heads, dim, generator=gen)
    k = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen)
    v = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen)
    to = dict(device=DEVICE)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to), tables.to(**to),
            torch.tensor(lengths, **to))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 16), (6, 2, 32), (4, 4, 24), (8, 1, 16)])
def test_kernel_matches_reference(splits, heads, kv_heads, dim):
    lengths = [1, 15, 16, 17, 70, 130]  # one token, block edges, several tiles
    q, k, v, tables, lens = make_case(lengths, heads, kv_heads, dim)
    out = paged_decode_attention(q, k, v, tables, lens, max_context=max(lengths), splits=splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, reference(q, k, v, tables, lens), atol=2e-5, rtol=1e-5)


def test_splits_beyond_the_context_contribute_nothing():
    """A launch sized for a long max_context (as a CUDA graph is) gives the same result for short contexts,
    although most of its splits see no tokens."""
    q, k, v, tables, lens = make_case([3, 40])
    short = paged_decode_attention(q, k, v, tables, lens, max_context=40, splits=1)
    wide = paged_decode_attention(q, k, v, tables, lens, max_context=8 * TILE, splits=8)
    assert torch.isfinite(wide).all()
    torch.testing.assert_close(wide, short, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 2])  # written directly, or merged by the second kernel
def test_bfloat16_cache(splits):
    q, k, v, tables, lens = make_case([5, 33, 100], dtype=torch.bfloat16)
    out = paged_decode_attention(q, k, v, tables, lens, max_context=100, splits=splits)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, tables, lens), atol=2e-2, rtol=2e-2)


def test_num_splits():
    cpu = torch.device("cpu")
    assert num_splits(64, 2, 2048, cpu) == 1  # many programs already
    assert num_splits(1, 1, 1000, cpu) == 2  # 2 programs wanted on CPU, 16 tiles available
    assert num_splits(1, 1, 10, cpu) == 1  # never a split shorter than a tile


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 16), (8, 1, 16)])
def test_torch_lookup_form_matches_reference(heads, kv_heads, dim):
    """The PyTorch form that compiled CPU engines use (block lookups and sums) against the same reference."""
    lengths = [1, 15, 16, 17, 70, 130]
    q, k, v, tables, lens = make_case(lengths, heads, kv_heads, dim)
    out = paged_decode_attention_torch(q, k, v, tables, lens)
    torch.testing.assert_close(out, reference(q, k, v, tables, lens), atol=2e-5, rtol=1e-5)

"""Sampling fused into one Triton kernel, for rows without top-k / top-p truncation (the RL default).

`sampler.sample` makes about fifteen passes over a [B, V] tensor (temperature, log-softmax, the hashed
noise in int64, the Gumbel transform, argmax); with a 152k vocabulary at batch 256 that is gigabytes of
memory traffic per decode step on a GPU. This kernel reads each logit once: one program per row walks the
vocabulary in tiles, computes the same hashed noise in registers, and keeps a running arg-max of
``logits / T + Gumbel`` and a running log-sum-exp of ``logits / T`` for the logprob. Tokens are those of
`sampler.sample` (same noise, same arg-max rule; the float rounding of the two can differ by an ulp, which
could only matter for an exact tie), logprobs agree within float32 rounding. The hash of each row's seed
and position is computed in the kernel as well, so a step's sampling is one launch. GPU only; the tests
run it in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _mix32(x):  # sampler.mix32 on uint32 (the multiplications wrap modulo 2**32, as `& MASK32` does there)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _sample_kernel(logits_ptr, stride, temperature_ptr, seeds_ptr, positions_ptr, tokens_ptr, logprobs_ptr, vocab,
                   BLOCK_V: tl.constexpr):
    b = tl.program_id(0)
    temperature = tl.load(temperature_ptr + b)
    greedy = temperature == 0
    t = tl.where(greedy, 1.0, temperature)
    # the row part of sampler.uniform_noise's hash (products wrap modulo 2**32 as `& MASK32` does there)
    seed = tl.load(seeds_ptr + b).to(tl.uint32)
    position = tl.load(positions_ptr + b).to(tl.uint32)
    row = _mix32(seed ^ _mix32(position * 0x61C88647 + 0x3C6EF372))
    best = tl.full([], float("-inf"), tl.float32)  # the best score so far and its token
    best_index = tl.full([], 0, tl.int32)
    m = tl.full([], float("-inf"), tl.float32)  # running max and sum of exp of the scaled logits
    s = tl.full([], 0.0, tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        ok = v < vocab
        x = tl.load(logits_ptr + b * stride + v, mask=ok, other=float("-inf")).to(tl.float32) / t
        h = _mix32(row ^ _mix32(v.to(tl.uint32) + 0x1B873593))
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216)
        score = tl.where(ok, x + tl.where(greedy, 0.0, -tl.log(-tl.log(u))), float("-inf"))
        tile_best = tl.max(score, axis=0)
        tile_index = tl.argmax(score, axis=0)  # first of equal maxima, as torch.argmax
        better = tile_best > best  # strictly: the earlier tile keeps a tie
        best_index = tl.where(better, v0 + tile_index, best_index)
        best = tl.where(better, tile_best, best)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    chosen = tl.load(logits_ptr + b * stride + best_index).to(tl.float32) / t
    tl.store(tokens_ptr + b, best_index)
    tl.store(logprobs_ptr + b, chosen - m - tl.log(s))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampler.sample` without truncation: (tokens [B] int64, logprobs [B] float32) from logits [B, V]."""
    b, vocab = logits.shape
    assert logits.stride(-1) == 1
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    assert temperature.dtype == torch.float32 and all(t.stride(0) == 1 for t in (temperature, seeds, positions))
    _sample_kernel[(b,)](logits, logits.stride(0), temperature, seeds, positions, tokens, logprobs, vocab,
                         BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)))
    return tokens, logprobs

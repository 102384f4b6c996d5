"""The samplers for rows without top-k / top-p against `sampler.sample`: the fused Triton kernel (in
Triton's interpreter on CPU) and the branch-free PyTorch form that compiled CPU engines use."""

from __future__ import annotations

import pytest
import torch

from m2flow.rollout.sampler import sample, sample_untruncated, uniform_noise
from m2flow.rollout.sampling_kernel import fused_sample

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(DEVICE)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3] * (batch // 4), device=DEVICE)
    seeds = torch.randint(0, 2**32, (batch,), generator=gen).to(DEVICE)
    positions = torch.randint(0, 5000, (batch,), generator=gen).to(DEVICE)
    positions[-1] = 2**31 + 12345  # the position hash wraps modulo 2**32 in the kernel, masks in the sampler
    return logits, temperature, seeds, positions


@pytest.mark.parametrize("untruncated", [fused_sample, sample_untruncated])
@pytest.mark.parametrize("vocab", [261, 1024, 3000])  # one partial tile, one full tile, several tiles
def test_untruncated_samplers_match_the_torch_sampler(vocab, untruncated):
    logits, temperature, seeds, positions = _inputs(32, vocab)
    no_k = torch.zeros(32, dtype=torch.int64, device=DEVICE)
    no_p = torch.ones(32, device=DEVICE)
    ref_tokens, ref_logprobs = sample(logits, temperature, no_k, no_p, seeds, positions)
    tokens, logprobs = untruncated(logits, temperature, seeds, positions)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=1e-5)
    assert tokens[0::4].tolist() == logits[0::4].argmax(-1).tolist()  # temperature 0: greedy
    assert len(set(tokens[1::4].tolist())) > 4  # sampled rows are not all the same token


def test_the_hash_is_the_samplers():
    """Same noise: with flat logits the arg-max of the noise alone picks the token."""
    _, _, seeds, positions = _inputs(8, 500, seed=1)
    flat = torch.zeros(8, 500, device=DEVICE)
    tokens, logprobs = fused_sample(flat, torch.ones(8, device=DEVICE), seeds, positions)
    assert tokens.tolist() == uniform_noise(seeds, positions, 500).argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.full((8,), -torch.log(torch.tensor(500.0)).item(), device=DEVICE))

"""Sampling and behaviour logprobs, batched, reproducible per sequence.

Each row draws its token as ``argmax(logits / T + Gumbel noise)`` over the tokens that top-k / top-p keep
(the Gumbel-max trick samples exactly from the truncated softmax). The noise is a hash of (the
sequence's seed, the position of the token, the vocabulary index), not a shared random stream, so a
sequence's samples do not depend on which other sequences share its batch, on preemption, or on the KV
budget: same seed, same samples. Temperature 0 is greedy (argmax of the raw logits).

The logprob returned for each token is ``log_softmax(logits / T)[token]``: after temperature scaling and
before top-p / top-k truncation (raw logits when greedy), the distribution the trainer recomputes.
"""

from __future__ import annotations

import functools

import torch

MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values in [0, 2**32).
    The multipliers are below 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    return x ^ (x >> 16)


def _hash_vocab(vocab_size: int, device: torch.device) -> torch.Tensor:
    return mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) + 0x1B873593)


_vocab_keys = functools.lru_cache(maxsize=8)(_hash_vocab)  # eagerly: computed once per vocabulary


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u in (0, 1) of shape [B, V] (float32), a deterministic function of (seed, position, vocab index)."""
    row = mix32(seeds ^ mix32((positions * 0x61C88647 + 0x3C6EF372) & MASK32))
    # compiled, the keys are recomputed inside the fused loop (free) rather than read from a cache
    keys = (_hash_vocab if torch.compiler.is_compiling() else _vocab_keys)(vocab_size, seeds.device)
    h = mix32(row[:, None] ^ keys[None, :])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] from `uniform_noise`: adding it to logits / T and taking the arg-max samples."""
    return -torch.log(-torch.log(uniform_noise(seeds, positions, vocab_size)))


def _scale(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy rows [B], logits / T [B, V] with T = 1 for greedy rows)."""
    greedy = temperature == 0
    return greedy, logits / torch.where(greedy, 1.0, temperature)[:, None]


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets to -inf the logits outside each row's top-k (0 = off) and top-p nucleus (1.0 = off); [B, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    drop = rank[None, :] >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop |= before > top_p[:, None]  # keeps the smallest prefix reaching top_p (never the first token)
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], logprobs [B]) from float32 logits [B, V]; per-row temperature [B] (0 = greedy), top_k [B]
    int, top_p [B], seeds [B] int64 in [0, 2**32), positions [B] int64 (index of the token being sampled)."""
    greedy, scaled = _scale(logits, temperature)
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):  # (an all-greedy batch, e.g. evaluation, needs no noise)
        candidates = scaled
        if bool(((top_k > 0) | (top_p < 1)).any()):
            candidates = truncate(scaled, top_k, top_p)
        gumbel = gumbel_noise(seeds, positions, logits.shape[-1])
        tokens = torch.where(greedy, tokens, (candidates + gumbel).argmax(dim=-1))
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


def sample_untruncated(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` for rows without top-k / top-p, branch-free so that torch.compile makes it a few fused loops
    (compiled CPU engines; GPUs use sampling_kernel.py): the same tokens and logprobs."""
    greedy, scaled = _scale(logits, temperature)
    gumbel = gumbel_noise(seeds, positions, logits.shape[-1])
    tokens = torch.where(greedy, logits.argmax(dim=-1), (scaled + gumbel).argmax(dim=-1))
    return tokens, torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)

"""Data parallelism over the trainer's ranks (the process group FSDP2 shards over).

Every rank receives the whole batch and computes the same split of each mini-batch into one part per rank,
balanced by tokens (`balanced_split`); a rank trains on its part. Three things keep N ranks equal to one:
- a micro-batch's loss weight is its share of the *whole* mini-batch's tokens (or sequences), times the
  world size, because FSDP2 averages gradients over ranks;
- every rank runs the same number of forward/backward passes (FSDP2's collectives must pair up): ranks with
  fewer micro-batches run dummy ones with weight 0 (`rank_micro_batches`);
- metric sums and the finite-loss flag are all-reduced, so every rank reports and decides the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the trainer's process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def balanced_split(lengths: list[int], parts: int) -> list[torch.Tensor]:
    """Row indices for each of `parts` ranks, balanced by `lengths` (longest first onto the least loaded rank;
    ties by index, so every rank computes the same split); each part in ascending order."""
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(parts), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += lengths[i]
    return [torch.tensor(sorted(p), dtype=torch.long) for p in out]


def rank_micro_batches(mini, micro_batches_of, rank: int, size: int) -> list[tuple[torch.Tensor, object, bool]]:
    """This rank's (rows of `mini`, micro-batch, real) triples, padded with dummy micro-batches (real=False) to
    the largest count over ranks. `micro_batches_of(batch)` gives (rows, micro-batch) pairs."""
    if size == 1:  # the whole mini-batch, as is
        return [(rows, mb, True) for rows, mb in micro_batches_of(mini)]
    parts = balanced_split(mini.attention_mask.sum(1).tolist(), size)
    per_rank = [micro_batches_of(mini.select(p)) if len(p) else [] for p in parts]
    mine = [(parts[rank][rows], mb, True) for rows, mb in per_rank[rank]]
    steps = max(len(m) for m in per_rank)
    dummy = mine[0][1] if mine else mini.select(torch.tensor([0]))
    return mine + [(torch.empty(0, dtype=torch.long), dummy, False)] * (steps - len(mine))


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """The sums over ranks of float values with the same keys on every rank."""
    if world()[1] == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())

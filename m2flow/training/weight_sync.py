"""The trainer's weights, whole, as a stream of size-bounded buckets: what the weight sync sends to the engines.

`full_weights(model)` yields one weight at a time, unsharded and on CPU (with FSDP2 each weight is all-gathered
as it comes, so every rank of the trainer's group iterates together); `buckets(weights, bucket_bytes)` groups
the stream, in order, into dicts of at most `bucket_bytes`. Neither ever holds the whole model: rank 0 puts
each bucket into the object store (scheduler/workers.py ActorWorker.weight_buckets) and each engine replica
fetches and loads them one at a time (RolloutWorker.load_weight_buckets).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

MB = 1 << 20  # train.weight_sync_bucket_mb counts MiB
GB = 1 << 30  # the weight_sync/gb metrics count GiB


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s weights one at a time as (HF name, whole tensor on CPU, a copy), in state_dict order (the same on
    every rank). A sharded weight (FSDP2 DTensor) is all-gathered when it is reached: a collective, so every rank
    of the trainer's group must run through the whole iterator together. A tied weight (e.g. lm_head.weight =
    model.embed_tokens.weight) comes once, under its first name: the engines keep their own ties."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # the parameters themselves: ties are `is`
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()  # on one rank this can alias the parameter: hence the copy below
        yield name, tensor.detach().to("cpu", copy=True)


def buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """The (name, tensor) stream grouped in order into dicts of at most `bucket_bytes` bytes: a bucket is closed
    when the next tensor would not fit in it, so a tensor larger than `bucket_bytes` goes alone. Lazy: a bucket
    is yielded before the stream is read past its first weight that did not fit."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in weights:
        n = nbytes(tensor)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor
        size += n
    if bucket:
        yield bucket


def load_full_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Whole tensors by HF name (a bucket of `buckets`) copied into `model`'s weights in place; a sharded model
    (FSDP2) takes from each tensor its own shard. A name the model does not have is a ValueError."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = model.state_dict(keep_vars=True)
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"weights the model does not have: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = params[name]
            if isinstance(target, DTensor):
                shard = distribute_tensor(tensor.to(target.device, target.dtype), target.device_mesh, target.placements)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(tensor.to(target.device, target.dtype))

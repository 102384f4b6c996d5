"""Worker groups: k Ray actors (ranks) of one worker class, addressed together.

The runner talks to groups, not to raw actor handles: `call(method, *args)` runs a method on every rank and
returns the results in rank order; `ranks[r]` is one rank's handle for anything else. Every rank of every
group is placed collocated (scheduler/cluster.py `launch`), on the devices `placements` gives each rank
(scheduler/devices.py: on CPU, pinned to its cores); placing groups on disjoint device sets is the next step.
"""

from __future__ import annotations

import os

import ray

from m2flow.scheduler.cluster import launch
from m2flow.scheduler.devices import Placement


class WorkerGroup:
    def __init__(self, cls, size: int, *args, name: str, threads: int = 1, placements: list[Placement] | None = None,
                 rank_kwargs=None, **kwargs):
        """`placements[r]`: rank r's cores and threads (else `threads` each, unpinned); `rank_kwargs(r)`: extra
        constructor arguments of rank r (e.g. its rank and the group's rendezvous)."""
        if size < 1:
            raise ValueError(f"a worker group needs at least one rank, got {size}")
        if placements is not None and len(placements) != size:
            raise ValueError(f"{size} ranks but {len(placements)} placements")
        self.name = name
        self.ranks = [launch(cls, *args, name=f"{name}-{r}",
                             threads=placements[r].threads if placements else threads,
                             placement=placements[r] if placements else None, **kwargs,
                             **(rank_kwargs(r) if rank_kwargs else {})) for r in range(size)]

    def __len__(self) -> int:
        return len(self.ranks)

    def remote(self, method: str, *args, **kwargs) -> list:
        """`method(*args, **kwargs)` started on every rank (ObjectRef arguments are fetched by each rank from the
        object store, not sent through the driver); the ObjectRefs of the results, in rank order."""
        return [getattr(r, method).remote(*args, **kwargs) for r in self.ranks]

    def call(self, method: str, *args, **kwargs) -> list:
        """`remote(...)`, waited for: the results in rank order."""
        return ray.get(self.remote(method, *args, **kwargs))

    def kill(self) -> None:
        for r in self.ranks:
            ray.kill(r)


def rank_group(cls, size: int, *args, name: str, placements: list[Placement], store: str, **kwargs) -> WorkerGroup:
    """`size` ranks of `cls(*args, **kwargs)` that form one process group (training/actor.py init_trainer_group)
    through the file store `store`: rank r gets rank=r, world_size=size and store; a stale file a killed run left is
    removed."""
    if os.path.exists(store):
        os.unlink(store)
    return WorkerGroup(cls, size, *args, name=name, placements=placements,
                       rank_kwargs=lambda r: {"rank": r, "world_size": size, "store": store}, **kwargs)


def split_by_work(weights: list[float], parts: int) -> list[range]:
    """Contiguous ranges covering the items in order, min(parts, items) of them, none empty, of about equal total
    weight: the k-th cut goes before the first item that lies mostly past k/parts of the total."""
    n = len(weights)
    parts, total = min(parts, n), float(sum(weights))
    bounds, acc, k = [0], 0.0, 1
    for i, w in enumerate(weights):
        left = n - i  # items from this one on; every part still to open needs one
        if k < parts and i > bounds[-1] and left >= parts - k and (acc + w / 2 > total * k / parts
                                                                   or left == parts - k):
            bounds.append(i)
            k += 1
        acc += w
    if n:
        bounds.append(n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def expected_work(prompt_tokens: list[int], params) -> list[float]:
    """Each prompt's expected generation work in tokens: its prompt, computed once (its samples share it), and
    params.n samples of at most params.max_new_tokens each."""
    return [float(t + params.n * params.max_new_tokens) for t in prompt_tokens]


def generate_on_replicas(group: WorkerGroup, prompts: list[str], params, prompt_tokens: list[int] | None = None):
    """Samples for `prompts` from a rollout group of engine replicas: the prompts split into contiguous shares of
    about equal expected work (`prompt_tokens`: each prompt's token count; without them equal shares), each
    replica seeding its samples by their global prompt index, so the samples are the same for any number of
    replicas and any split; returned prompt-major with global prompt indices."""
    work = expected_work(prompt_tokens, params) if prompt_tokens is not None else [1.0] * len(prompts)
    shares = split_by_work(work, len(group))
    parts = ray.get([group.ranks[r].generate.remote(prompts[share.start: share.stop], params, first_index=share.start)
                     for r, share in enumerate(shares)])
    samples = []
    for share, part in zip(shares, parts):
        for sample in part:
            sample.prompt_index += share.start
        samples.extend(part)
    return samples

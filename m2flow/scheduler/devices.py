"""The devices a run places its worker groups on (cluster.device, cluster.devices), and which of them each rank
of a group gets.

On CPU a logical device is a set of cores: the cores this process may use (`os.sched_getaffinity`, the first
cluster.num_cpus of them when set) split into cluster.devices equal contiguous sets. A rank placed on a device
pins itself to the device's cores and runs as many torch threads, so an N-device run on one machine is real
and measurable: 2 trainer ranks on 2 one-core devices really run side by side, each on its own core.

Collocated, every group spans all the devices: a group of k ranks on N devices gives rank r the devices
[r N/k, (r+1) N/k) when k <= N (one rank may hold several devices: their cores together), and device r mod N
when k > N (ranks on one device share its cores' threads).

GPUs are not placed yet (issue 14): config validation refuses cluster.device=cuda, and auto picks the CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from m2flow.config import ClusterConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where one rank runs: the cores it is pinned to and its torch threads."""

    cores: tuple[int, ...]
    threads: int


def run_devices(cluster: ClusterConfig) -> list[tuple[int, ...]]:
    """The run's devices (validated cluster.device: auto or cpu), each a tuple of cores; logged."""
    if cluster.device == "auto":
        import torch

        if torch.cuda.is_available():
            log.warning("a GPU is visible, but worker groups are not placed on GPUs yet (issue 14): running on CPU")
    devices = cpu_devices(cluster.devices, usable_cores(cluster.num_cpus))
    log.info("devices: %d, cores %s", len(devices), " | ".join(",".join(map(str, d)) for d in devices))
    return devices


def usable_cores(num_cpus: int | None = None) -> list[int]:
    """The cores this process may run on, in order (the first `num_cpus` of them when given)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return cores[:num_cpus] if num_cpus else cores


def cpu_devices(count: int, cores: list[int]) -> list[tuple[int, ...]]:
    """`cores` split into `count` logical devices (0 = one device of all of them): contiguous sets whose sizes
    differ by at most one."""
    count = count or 1
    if count > len(cores):
        raise ValueError(f"cluster.devices={count}, but only {len(cores)} cores are usable here: a CPU device needs at "
                         f"least one core (cluster.devices <= {len(cores)})")
    bounds = [round(i * len(cores) / count) for i in range(count + 1)]
    return [tuple(cores[a:b]) for a, b in zip(bounds, bounds[1:])]


def place(ranks: int, devices: list[tuple[int, ...]]) -> list[Placement]:
    """Each rank's cores and threads for a group of `ranks` collocated over `devices` (see the module doc)."""
    n = len(devices)
    if ranks <= n:
        out = []
        for r in range(ranks):
            cores = tuple(c for d in devices[r * n // ranks:(r + 1) * n // ranks] for c in d)
            out.append(Placement(cores, len(cores)))
        return out
    sharing = [len(range(d, ranks, n)) for d in range(n)]  # ranks on each device
    return [Placement(devices[r % n], max(1, len(devices[r % n]) // sharing[r % n])) for r in range(ranks)]


def pin(placement: Placement | None, threads: int) -> None:
    """In a worker: pin this process to the placement's cores and set its torch threads to the placement's;
    without a placement, only `threads`."""
    import torch

    if placement is not None:
        try:
            os.sched_setaffinity(0, placement.cores)
        except (AttributeError, OSError) as e:  # no affinity on this OS, or cores this machine does not have
            log.warning("cannot pin to cores %s (%s): running unpinned with %d threads", placement.cores, e,
                        placement.threads)
        threads = placement.threads
    torch.set_num_threads(max(threads, 1))

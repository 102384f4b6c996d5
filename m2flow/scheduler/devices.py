"""The devices a run places its worker groups on (cluster.device, cluster.devices), and which of them each rank
of a group gets.

On CPU a logical device is a set of cores of one node: each node's cores split into equal contiguous sets. A
rank placed on a device runs on that device's node, pins itself to the device's cores and runs as many torch
threads, so an N-device run on one machine is real and measurable: 2 trainer ranks on 2 one-core devices really
run side by side, each on its own core.

The nodes are the Ray cluster's live nodes with CPUs (one for a locally started Ray; several with
cluster.address), the driver's node first. cluster.devices are spread over them in that order as evenly as
possible (0 = one device per node, of all its cores). The driver's node offers the cores this process may use
(`os.sched_getaffinity`, as many as Ray counts CPUs on it); another node offers cores 0 .. its Ray CPU count - 1
(a rank that cannot pin to them runs unpinned, with a warning).

Collocated, every group spans all the devices: a group of k ranks on N devices gives rank r the devices
[r N/k, (r+1) N/k) when k <= N (one rank may hold several devices of one node: their cores together; those of
its range on another node are left to other ranks), and device r mod N when k > N (ranks on one device share
its cores' threads).

On GPUs (cluster.device=cuda, or auto on a Ray cluster with GPUs) a device is one GPU: the run reserves
cluster.devices of them (0 = all) as a placement group of one-GPU bundles, packed onto as few nodes as hold them.
A rank placed on one runs in that bundle and requests a small share of its GPU, so Ray shows it exactly that GPU
(CUDA_VISIBLE_DEVICES) and the groups collocated on it share it; it computes on "cuda". With k ranks on N GPUs,
rank r gets GPU r N/k when k <= N, and GPU r mod N when k > N. (The GPU path has not run on a real GPU yet: its
placement is tested with Ray's logical GPUs.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from m2flow.config import ClusterConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """One device of the run: a set of cores of one node (CPU), or one GPU of one node, reserved as bundle `gpu` of
    the run's placement group `group` (GPU)."""

    cores: tuple[int, ...]
    node: str = ""  # the Ray node id ("" = the driver's node, before Ray is up)
    gpu: int | None = None  # GPU devices: the bundle index in `group`
    group: Any = None  # GPU devices: the ray.util.placement_group.PlacementGroup holding one GPU per bundle
    index: int = 0  # its position among the run's devices (what cluster.placement's device sets name)


@dataclass(frozen=True)
class Placement:
    """Where one rank runs: its node, the cores it is pinned to and its torch threads; on a GPU device, its GPU
    (bundle `gpu` of placement group `group`, which Ray exposes to the rank as CUDA_VISIBLE_DEVICES)."""

    cores: tuple[int, ...]
    threads: int
    node: str = ""  # the Ray node id the rank is scheduled on ("" = anywhere: the driver's node, locally)
    gpu: int | None = None
    group: Any = None
    devices: str = ""  # the indices of the run's devices it runs on, e.g. "1" or "0-1" (for the timeline)

    @property
    def device(self) -> str:
        """The torch device the rank computes on: "cuda" (its one visible GPU) or "cpu"."""
        return "cpu" if self.gpu is None else "cuda"


def check_devices(cluster: ClusterConfig) -> None:
    """Before Ray starts: a locally started Ray's cluster.devices fit this machine's cores (ValueError naming the
    key if not); a cluster's nodes are only known once Ray is up (run_devices checks them then)."""
    if cluster.address is None and device_kind(cluster) == "cpu":
        cpu_devices(cluster.devices, usable_cores(cluster.num_cpus))


def device_kind(cluster: ClusterConfig, cluster_gpus: float | None = None) -> str:
    """"cuda" or "cpu": cluster.device, with auto = cuda when there are GPUs (the Ray cluster's, when it is up and
    `cluster_gpus` is given; else this machine's)."""
    if cluster.device != "auto":
        return cluster.device
    if cluster_gpus is not None:
        return "cuda" if cluster_gpus >= 1 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_devices(cluster: ClusterConfig) -> list[Device]:
    """The run's devices (cluster.device, cluster.devices) over the Ray cluster's live nodes (Ray must be up);
    logged. GPU devices are reserved as a placement group of one-GPU bundles, packed onto as few nodes as can
    hold them (cluster.devices = 0: every GPU of the cluster)."""
    import ray

    if device_kind(cluster, ray.cluster_resources().get("GPU", 0.0)) == "cuda":
        devices = gpu_devices(cluster.devices)
        log.info("devices: %d GPUs; %s", len(devices), " | ".join(f"node {d.node[:8]} bundle {d.gpu}" for d in devices))
        return [dataclasses.replace(d, index=i) for i, d in enumerate(devices)]
    devices = [dataclasses.replace(d, index=i) for i, d in enumerate(spread_devices(cluster.devices, ray_nodes()))]
    log.info("devices: %d; %s", len(devices), " | ".join(f"node {d.node[:8]} cores {','.join(map(str, d.cores))}"
                                                         for d in devices))
    return devices


def gpu_devices(count: int, timeout_s: float = 60.0) -> list[Device]:
    """`count` GPUs (0 = all of the cluster's) reserved as a placement group of {"GPU": 1} bundles, strategy PACK;
    a device per bundle, on the node Ray put it on. Raises ValueError when the cluster has fewer GPUs, or when
    they are not free within `timeout_s` (held by another job)."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    total = int(ray.cluster_resources().get("GPU", 0))
    if total == 0:
        raise ValueError("cluster.device=cuda, but the Ray cluster has no GPU: use cluster.device=cpu (or auto)")
    count = count or total
    if count < 1 or count > total:
        raise ValueError(f"cluster.devices={count} GPUs, but the Ray cluster has {total}: set cluster.devices <= "
                         f"{total} (0 = all), or cluster.device=cpu")
    group = placement_group([{"GPU": 1}] * count, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ValueError(f"{count} GPUs could not be reserved within {timeout_s:.0f} s: the cluster's GPUs are held "
                         f"by other jobs (ray status shows them)")
    nodes = placement_group_table(group)["bundles_to_node_id"]
    return [Device((), nodes[i], i, group) for i in range(count)]


def release_devices(devices: list[Device]) -> None:
    """Frees the GPUs run_devices reserved (their placement group); CPU devices hold nothing."""
    if devices and devices[0].group is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(devices[0].group)


def ray_nodes() -> list[tuple[str, list[int]]]:
    """(node id, cores offered) of each live Ray node with at least one CPU, the driver's node first, then by id."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = sorted((n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1),
                   key=lambda n: (n["NodeID"] != here, n["NodeID"]))
    return [(n["NodeID"], usable_cores(int(n["Resources"]["CPU"])) if n["NodeID"] == here
             else list(range(int(n["Resources"]["CPU"])))) for n in nodes]


def spread_devices(count: int, nodes: list[tuple[str, list[int]]]) -> list[Device]:
    """`count` devices (0 = one per node) spread over `nodes` [(node id, cores)] in order, as evenly as possible,
    each node's share cut from its cores by cpu_devices; node by node."""
    n = len(nodes)
    count = count or n
    out = []
    for i, (node, cores) in enumerate(nodes):
        share = count * (i + 1) // n - count * i // n
        if n > 1 and share > len(cores):
            raise ValueError(f"cluster.devices={count} over {n} nodes puts {share} devices on node {node[:8]}, which "
                             f"offers only {len(cores)} cores: a CPU device needs at least one core")
        out += [Device(d, node) for d in cpu_devices(share, cores)] if share else []
    return out


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


def place(ranks: int, devices: list[Device]) -> list[Placement]:
    """Each rank's node, cores and threads for a group of `ranks` collocated over `devices` (see the module doc)."""
    n = len(devices)
    if devices and devices[0].gpu is not None:  # a rank per GPU; more ranks than GPUs share them round robin
        cpus = max(1, len(usable_cores()) // n)  # host threads of a GPU rank (tokenizer, layouts, sampling)
        return [Placement((), cpus, d.node, d.gpu, d.group, str(d.index))
                for d in (devices[r * n // ranks] if ranks <= n else devices[r % n] for r in range(ranks))]
    if ranks <= n:
        out = []
        for r in range(ranks):
            held = [d for d in devices[r * n // ranks:(r + 1) * n // ranks] if d.node == devices[r * n // ranks].node]
            cores = tuple(c for d in held for c in d.cores)
            out.append(Placement(cores, len(cores), held[0].node, devices=device_label([d.index for d in held])))
        return out
    sharing = [len(range(d, ranks, n)) for d in range(n)]  # ranks on each device
    return [Placement(devices[r % n].cores, max(1, len(devices[r % n].cores) // sharing[r % n]), devices[r % n].node,
                      devices=str(devices[r % n].index)) for r in range(ranks)]


def device_label(indices) -> str:
    """Device indices as ranges: [0, 1, 2, 5] -> '0-2,5'."""
    indices = sorted(indices)
    parts, start = [], None
    for i, d in enumerate(indices):
        start = d if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != d + 1:
            parts.append(str(d) if d == start else f"{start}-{d}")
            start = None
    return ",".join(parts)


def pin(placement: Placement | None, threads: int) -> None:
    """In a worker: pin this process to the placement's cores and set its torch threads to the placement's;
    without a placement, only `threads`."""
    import torch

    if placement is not None and placement.cores:
        try:
            os.sched_setaffinity(0, placement.cores)
        except (AttributeError, OSError) as e:  # no affinity on this OS, or cores this machine does not have
            log.warning("cannot pin to cores %s (%s): running unpinned with %d threads", placement.cores, e,
                        placement.threads)
        threads = placement.threads
    torch.set_num_threads(max(threads, 1))


def parse_devices(devices: str) -> list[int]:
    """The device indices of a `devices` string: "1" -> [1], "0-1" -> [0, 1], "0-2,5" -> [0, 1, 2, 5], "" -> []."""
    out: set[int] = set()
    for part in str(devices).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        out.update(range(int(lo), int(hi) + 1) if sep else (int(lo),))
    return sorted(out)

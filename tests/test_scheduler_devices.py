"""Logical devices (issue 14): on CPU a device is a set of cores of one node, and a rank placed on one runs on that
node, pinned to them."""

from __future__ import annotations

import os
import sys

import pytest
import ray

from m2flow.config import ConfigError, load_config
from m2flow.scheduler.devices import (
    Device,
    Placement,
    check_devices,
    cpu_devices,
    place,
    release_devices,
    run_devices,
    spread_devices,
    usable_cores,
)


def test_cores_split_into_even_contiguous_devices():
    assert cpu_devices(0, [0, 1, 2, 3]) == [(0, 1, 2, 3)]  # 0: one device of every core
    assert cpu_devices(2, [0, 1, 2, 3]) == [(0, 1), (2, 3)]
    assert cpu_devices(2, [4, 5, 7]) == [(4, 5), (7,)]  # the cores this process may use, whatever their numbers
    assert cpu_devices(3, list(range(8))) == [(0, 1, 2), (3, 4), (5, 6, 7)]
    assert cpu_devices(4, [0, 1, 2, 3]) == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ValueError, match=r"cluster.devices=3, but only 2 cores are usable here"):
        cpu_devices(3, [0, 1])


def test_usable_cores_follow_the_affinity_and_num_cpus():
    mine = sorted(os.sched_getaffinity(0))
    assert usable_cores() == mine
    assert usable_cores(1) == mine[:1]


def test_devices_spread_over_nodes():
    nodes = [("a", [0, 1, 2, 3]), ("b", [0, 1])]
    assert spread_devices(0, nodes) == [Device((0, 1, 2, 3), "a"), Device((0, 1), "b")]  # 0: one per node
    assert spread_devices(3, nodes) == [Device((0, 1, 2, 3), "a"), Device((0,), "b"), Device((1,), "b")]
    assert spread_devices(4, nodes) == [Device((0, 1), "a"), Device((2, 3), "a"), Device((0,), "b"), Device((1,), "b")]
    assert spread_devices(1, nodes) == [Device((0, 1), "b")]  # the share of each node rounds down until the last
    with pytest.raises(ValueError, match=r"cluster.devices=6 over 2 nodes puts 3 devices on node b, which offers only 2"):
        spread_devices(6, nodes)
    with pytest.raises(ValueError, match=r"cluster.devices=3, but only 2 cores are usable here"):
        spread_devices(3, [("a", [0, 1])])


def test_a_group_spans_the_devices():
    devices = [Device((0, 1), index=0), Device((2, 3), index=1)]
    # fewer ranks than devices: a rank holds several devices, with all their cores as threads
    assert place(1, devices) == [Placement((0, 1, 2, 3), 4, devices="0-1")]
    assert place(2, devices) == [Placement((0, 1), 2, devices="0"), Placement((2, 3), 2, devices="1")]
    # more ranks than devices: round robin, the device's cores shared between its ranks
    assert place(4, devices) == [Placement((0, 1), 1, devices="0"), Placement((2, 3), 1, devices="1"),
                                 Placement((0, 1), 1, devices="0"), Placement((2, 3), 1, devices="1")]
    # a role's own devices (a disaggregated placement) keep their indices among the run's devices
    assert place(1, devices[1:]) == [Placement((2, 3), 2, devices="1")]
    assert place(3, [Device((0,)), Device((1,), index=1)]) == [Placement((0,), 1, devices="0"),
                                                               Placement((1,), 1, devices="1"),
                                                               Placement((0,), 1, devices="0")]
    # over nodes: a rank holds the devices of its share on its first device's node, and runs there
    two_nodes = [Device((0,), "a", index=0), Device((1,), "a", index=1), Device((0, 1), "b", index=2)]
    assert place(1, two_nodes) == [Placement((0, 1), 2, "a", devices="0-1")]
    assert place(2, two_nodes) == [Placement((0,), 1, "a", devices="0"), Placement((1,), 1, "a", devices="1")]
    assert place(3, two_nodes) == [Placement((0,), 1, "a", devices="0"), Placement((1,), 1, "a", devices="1"),
                                   Placement((0, 1), 2, "b", devices="2")]


def test_device_kinds():
    from m2flow.scheduler.cluster import start_ray, stop_ray

    cores = usable_cores()
    check_devices(load_config(None, [f"cluster.devices={len(cores)}"]).cluster)
    with pytest.raises(ValueError, match=rf"cluster.devices={len(cores) + 1}, but only {len(cores)} cores"):
        check_devices(load_config(None, [f"cluster.devices={len(cores) + 1}"]).cluster)
    started = not ray.is_initialized()
    start_ray(load_config(None, []).cluster)
    try:
        here = ray.get_runtime_context().get_node_id()
        assert run_devices(load_config(None, ["cluster.device=cpu"]).cluster) == [Device(tuple(cores), here)]
        if not ray.cluster_resources().get("GPU"):
            with pytest.raises(ValueError, match="cluster.device=cuda, but the Ray cluster has no GPU"):
                run_devices(load_config(None, ["cluster.device=cuda"]).cluster)
        assert run_devices(load_config(None, []).cluster) == [Device(tuple(cores), here)]  # auto: no GPUs placed yet
    finally:
        if started:
            stop_ray()
    assert load_config(None, ["cluster.device=cuda"]).cluster.device == "cuda"
    with pytest.raises(ConfigError, match=r"cluster.device must be one of auto, cpu, cuda; got 'tpu'"):
        load_config(None, ["cluster.device=tpu"])
    with pytest.raises(ConfigError, match=r"cluster.devices must be >= 0"):
        load_config(None, ["cluster.devices=-1"])


class _Probe:
    """A worker that reports where it landed: its cores and threads, its Ray node, its GPU."""

    def __init__(self, threads: int = 1, placement: Placement | None = None):
        from m2flow.scheduler.devices import pin

        pin(placement, threads)
        self.placement = placement

    def where(self) -> tuple[list[int], int]:
        import torch

        return sorted(os.sched_getaffinity(0)), torch.get_num_threads()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def gpu(self) -> tuple[str, str, str]:
        return self.node(), os.environ.get("CUDA_VISIBLE_DEVICES", ""), self.placement.device


def test_ranks_are_pinned_to_their_devices_cores():
    from m2flow.scheduler.cluster import start_ray, stop_ray
    from m2flow.scheduler.group import WorkerGroup

    cores = usable_cores()
    devices = [Device(d) for d in cpu_devices(min(2, len(cores)), cores)]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    started = not ray.is_initialized()
    start_ray(load_config(None, []).cluster)
    try:
        group = WorkerGroup(_Probe, len(devices), name="devices-probe", placements=place(len(devices), devices))
        assert group.call("where") == [(list(d.cores), len(d.cores)) for d in devices]
        whole = WorkerGroup(_Probe, 1, name="devices-probe-whole", placements=place(1, devices))
        assert whole.call("where") == [(cores, len(cores))]
        for g in (group, whole):
            g.kill()
    finally:
        if started:
            stop_ray()


def test_a_group_spans_the_nodes_of_a_cluster():
    """Two simulated nodes of one CPU: 2 devices, one per node, and a 2-rank group has a rank on each."""
    from ray.cluster_utils import Cluster

    from m2flow.scheduler.group import WorkerGroup

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        here = ray.get_runtime_context().get_node_id()
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        devices = run_devices(load_config(None, [f"cluster.address={cluster.address}"]).cluster)  # 0: one per node
        assert devices == [Device((0,), here), Device((0,), next(n for n in nodes if n != here), index=1)]
        assert run_devices(load_config(None, [f"cluster.address={cluster.address}", "cluster.devices=2"]).cluster) == devices
        with pytest.raises(ValueError, match=r"cluster.devices=4 over 2 nodes puts 2 devices on node"):
            run_devices(load_config(None, [f"cluster.address={cluster.address}", "cluster.devices=4"]).cluster)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
        group = WorkerGroup(_Probe, 2, name="nodes-probe", placements=place(2, devices))
        assert group.call("node") == [d.node for d in devices]
        single = WorkerGroup(_Probe, 1, name="nodes-probe-one", placements=place(1, devices))
        assert single.call("node") == [here]  # a rank holding both devices runs on its first device's node
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_gpu_devices_are_bundles_and_ranks_see_their_gpu():
    """GPU placement without a GPU: Ray's logical GPUs on 2 simulated nodes (2 + 1). The run reserves one bundle per
    device; each rank lands in its device's bundle and sees exactly that GPU as CUDA_VISIBLE_DEVICES, and groups
    on the same devices share the GPUs (collocated)."""
    from ray.cluster_utils import Cluster

    from m2flow.scheduler.group import WorkerGroup

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        auto = load_config(None, [f"cluster.address={cluster.address}"]).cluster  # auto: the cluster has GPUs
        with pytest.raises(ValueError, match=r"cluster.devices=4 GPUs, but the Ray cluster has 3"):
            run_devices(load_config(None, [f"cluster.address={cluster.address}", "cluster.devices=4"]).cluster)
        devices = run_devices(auto)  # 0: all 3
        assert [d.gpu for d in devices] == [0, 1, 2] and all(d.cores == () for d in devices)
        assert len({d.node for d in devices}) == 2
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
        trainer = WorkerGroup(_Probe, 3, name="gpu-probe", placements=place(3, devices))
        engines = WorkerGroup(_Probe, 3, name="gpu-probe-2", placements=place(3, devices))
        seen, again = trainer.call("gpu"), engines.call("gpu")
        assert [node for node, _, _ in seen] == [d.node for d in devices]
        assert all(gpu != "" and "," not in gpu and kind == "cuda" for _, gpu, kind in seen)  # one GPU each
        assert len({(node, gpu) for node, gpu, _ in seen}) == 3  # three different GPUs
        assert again == seen  # the second group's ranks share the first's GPUs
        shared = WorkerGroup(_Probe, 6, name="gpu-probe-6", placements=place(6, devices)).call("gpu")
        assert shared == seen + seen  # more ranks than GPUs: round robin
        release_devices(devices)  # the GPUs are free for the next run
        assert [d.gpu for d in run_devices(auto)] == [0, 1, 2]
    finally:
        ray.shutdown()
        cluster.shutdown()

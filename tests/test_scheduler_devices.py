"""Logical devices (issue 14): on CPU a device is a set of cores, and a rank placed on one is pinned to them."""

from __future__ import annotations

import os
import sys

import pytest
import ray

from m2flow.config import ConfigError, load_config
from m2flow.scheduler.devices import Placement, cpu_devices, place, run_devices, usable_cores


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


def test_a_group_spans_the_devices():
    devices = [(0, 1), (2, 3)]
    # fewer ranks than devices: a rank holds several devices, with all their cores as threads
    assert place(1, devices) == [Placement((0, 1, 2, 3), 4)]
    assert place(2, devices) == [Placement((0, 1), 2), Placement((2, 3), 2)]
    # more ranks than devices: round robin, the device's cores shared between its ranks
    assert place(4, devices) == [Placement((0, 1), 1), Placement((2, 3), 1), Placement((0, 1), 1), Placement((2, 3), 1)]
    assert place(3, [(0,), (1,)]) == [Placement((0,), 1), Placement((1,), 1), Placement((0,), 1)]


def test_device_kinds():
    cores = usable_cores()
    assert run_devices(load_config(None, ["cluster.device=cpu"]).cluster) == [tuple(cores)]
    assert run_devices(load_config(None, []).cluster) == [tuple(cores)]  # auto: GPUs are not placed yet
    with pytest.raises(ConfigError, match="cluster.device=cuda: placing worker groups on GPUs is not built yet"):
        load_config(None, ["cluster.device=cuda"])
    with pytest.raises(ConfigError, match=r"cluster.device must be one of auto, cpu, cuda; got 'tpu'"):
        load_config(None, ["cluster.device=tpu"])
    with pytest.raises(ConfigError, match=r"cluster.devices must be >= 0"):
        load_config(None, ["cluster.devices=-1"])


class _Probe:
    def __init__(self, threads: int = 1, placement: Placement | None = None):
        from m2flow.scheduler.devices import pin

        pin(placement, threads)

    def where(self) -> tuple[list[int], int]:
        import torch

        return sorted(os.sched_getaffinity(0)), torch.get_num_threads()


def test_ranks_are_pinned_to_their_devices_cores():
    from m2flow.scheduler.cluster import start_ray, stop_ray
    from m2flow.scheduler.group import WorkerGroup

    cores = usable_cores()
    devices = cpu_devices(min(2, len(cores)), cores)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    started = not ray.is_initialized()
    start_ray(load_config(None, []).cluster)
    try:
        group = WorkerGroup(_Probe, len(devices), name="devices-probe", placements=place(len(devices), devices))
        assert group.call("where") == [(list(d), len(d)) for d in devices]
        whole = WorkerGroup(_Probe, 1, name="devices-probe-whole", placements=place(1, devices))
        assert whole.call("where") == [(cores, len(cores))]
        for g in (group, whole):
            g.kill()
    finally:
        if started:
            stop_ray()

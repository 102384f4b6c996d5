"""Ray: start it locally or join a cluster, and place worker groups.

Placement `collocated` puts every worker group on the same devices: stages run in turn, and a group's ranks
spread over all the devices, on every node of the cluster (scheduler/devices.py: on CPU, each rank on its
device's node, pinned to its cores, as many torch threads; with one device, every worker uses all the cores
while it runs). Across nodes, the run directory (checkpoints, the trainer ranks' rendezvous file) and the model
directory must be on a filesystem every node shares.

A locally started Ray runs without authentication (RAY_AUTH_MODE=disabled), so it listens on the loopback
interface only: its node IP is 127.0.0.1, and Ray binds the GCS, raylet, object manager and worker ports to
the node IP. `cluster.listen_all=true` keeps Ray's default (all interfaces) and warns. Its processes do not
outlive the driver, even one killed with SIGKILL (scheduler/orphans.py).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import ray

from m2flow.config import ClusterConfig
from m2flow.scheduler.orphans import OrphanGuard, guard_new_children

log = logging.getLogger(__name__)
_guard: OrphanGuard | None = None  # over the processes of the Ray that start_ray started here


def start_ray(cfg: ClusterConfig) -> dict:
    """`ray.init` locally (address None) or against `cfg.address`; returns the cluster's resources."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not ray.is_initialized():
        # "local": always a new Ray of this run's own (None would join another Ray already running on the machine)
        kwargs = dict(address=cfg.address or "local", include_dashboard=False, logging_level=logging.WARNING,
                      log_to_driver=True)
        if cfg.address is None:
            kwargs["num_cpus"] = cfg.num_cpus or os.cpu_count()
        if cfg.address is None and cfg.listen_all:
            log.warning("cluster.listen_all=true: Ray listens on all network interfaces without authentication; "
                        "anyone who can reach this machine's ports can run code on it")
        with loopback_only(cfg.address is None and not cfg.listen_all):
            global _guard
            if cfg.address is None:  # a local Ray: its processes must not outlive a killed driver
                _guard = guard_new_children(lambda: ray.init(**kwargs))
            else:
                ray.init(**kwargs)
    resources = ray.cluster_resources()
    log.info("ray cluster resources: %s", resources)
    return resources


def stop_ray() -> None:
    """`ray.shutdown()`, then make sure nothing of a locally started Ray is left running."""
    global _guard
    ray.shutdown()
    if _guard is not None:
        _guard.close()
        _guard = None


@contextmanager
def loopback_only(enabled: bool = True):
    """While Ray starts: its node IP is 127.0.0.1, so its servers bind to loopback. (`ray.init(_node_ip_address=
    "127.0.0.1")` does not do it: Ray resolves a localhost address to the machine's external IP; its own
    loopback mode, used on macOS/Windows, is this switch, read when the node IP is resolved.)"""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = saved and not enabled
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


GPU_SHARE = 0.01  # of its GPU that a rank requests: Ray then sets its CUDA_VISIBLE_DEVICES, and up to 100 ranks share


def launch(cls, *args, name: str, threads: int, **kwargs):
    """One Ray actor of `cls`, collocated: it reserves no CPU slot (all groups share the devices) and sets
    its torch threads to `threads`; with a `placement` keyword (scheduler/devices.py) whose node is known, it runs
    on that node (and pins itself to the placement's cores); on a GPU device, in that GPU's bundle of the run's
    placement group, seeing that one GPU."""
    remote = ray.remote(num_cpus=0)(cls)
    env = {"OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    options = {"name": name, "runtime_env": {"env_vars": env}}
    placement = kwargs.get("placement")
    if placement is not None and placement.gpu is not None:  # in its GPU's bundle, sharing the GPU with the
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # other groups' ranks on it

        options["num_gpus"] = GPU_SHARE
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement.group, placement_group_bundle_index=placement.gpu)
    elif placement is not None and placement.node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(placement.node, soft=False)
    return remote.options(**options).remote(*args, threads=threads, **kwargs)

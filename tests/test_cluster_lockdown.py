"""A locally started Ray listens on loopback only (issue 12); running it open needs cluster.listen_all=true,
which warns."""

from __future__ import annotations

import json
import logging
import os

import pytest

from m2flow.config import ClusterConfig, ConfigError, load_config


def _descendants(root: int) -> set[int]:
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _listening_addresses(pids: set[int]) -> dict[str, str]:
    """Socket inode -> local IP of the TCP sockets these processes listen on (from /proc: no `ss` needed)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    out[cols[9]] = _ip(cols[1].split(":")[0])
    return out


def _ip(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # /proc prints each 32-bit word little-endian
    data = b"".join(words)
    if len(data) == 16 and data[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        data = data[12:]
    return ".".join(map(str, data)) if len(data) == 4 else data.hex()


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_local_ray_listens_on_loopback_only():
    import ray

    from m2flow.scheduler.cluster import start_ray

    assert not ray.is_initialized()
    before = _listening_addresses(_descendants(os.getpid()))  # e.g. a gloo store of another test: not Ray's
    start_ray(ClusterConfig(num_cpus=1))
    try:
        @ray.remote(num_cpus=0)
        class Echo:
            def ping(self) -> int:
                return 1

        assert ray.get(Echo.remote().ping.remote()) == 1  # a worker with its own server is up
        found = _listening_addresses(_descendants(os.getpid()))
        addresses = [ip for inode, ip in found.items() if inode not in before]
        assert len(addresses) >= 3  # GCS, raylet, workers
        assert all(a.startswith("127.") for a in addresses), addresses  # no 0.0.0.0, ::, or the machine's IP
    finally:
        ray.shutdown()


def test_listen_all_warns(monkeypatch, caplog):
    import ray

    from m2flow.scheduler import cluster

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    from ray._private import ray_constants

    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(loopback=not ray_constants.ENABLE_RAY_CLUSTER))
    with caplog.at_level(logging.WARNING):
        cluster.start_ray(ClusterConfig(num_cpus=1, listen_all=True))
    assert seen == {"loopback": False}
    assert "listens on all network interfaces" in caplog.text
    caplog.clear()
    cluster.start_ray(ClusterConfig(num_cpus=1))
    assert seen == {"loopback": True} and "all network interfaces" not in caplog.text


def test_listen_all_needs_a_local_ray():
    with pytest.raises(ConfigError, match="cluster.listen_all applies to a locally started Ray"):
        load_config(None, ["cluster.listen_all=true", "cluster.address=auto"])


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_trainer_process_group_listens_on_loopback_only():
    """The trainer's one-rank gloo group (a fresh process: this one may have a group already) opens no
    all-interfaces store server."""
    import subprocess
    import sys

    code = ("import json, os, sys; sys.path.insert(0, 'tests'); from test_cluster_lockdown import _listening_addresses;"
            "from m2flow.training.actor import init_single_process_group; init_single_process_group();"
            "print(json.dumps(sorted(set(_listening_addresses({os.getpid()}).values()))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    addresses = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(a.startswith("127.") for a in addresses), addresses

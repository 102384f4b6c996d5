"""No orphan processes (issue 12): a driver killed with SIGKILL leaves nothing of its local Ray running (Ray's
own agents would stay forever), and the guard never touches a process whose pid was reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from m2flow.scheduler.orphans import OrphanGuard, _stat, descendants

DRIVER = """
import json, os, sys, time
from m2flow.config import ClusterConfig
from m2flow.scheduler.cluster import start_ray
from m2flow.scheduler.orphans import descendants
start_ray(ClusterConfig(num_cpus=1))
print(json.dumps(descendants(os.getpid())), flush=True)
time.sleep(600)
"""


def _alive(processes) -> list:
    return [(pid, started) for pid, started in processes if (s := _stat(pid)) is not None and s[1] == started]


def _wait_until_gone(processes, limit_s: float = 120.0) -> list:
    """Polls until the processes are gone (a safety limit, not a timing assertion); returns those left."""
    deadline = time.monotonic() + limit_s
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _alive(processes)


def test_a_killed_driver_leaves_no_ray_process():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        ray_processes = [tuple(p) for p in json.loads(driver.stdout.readline())]
        names = [open(f"/proc/{pid}/comm").read().strip() for pid, _ in ray_processes]
        assert "raylet" in names and "gcs_server" in names, names
        assert any("Agent" in n or "ray::" in n for n in names), names  # the processes Ray itself leaks
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as `kill -9 PID` or the OOM killer does
        driver.wait()
    left = _wait_until_gone(ray_processes)
    assert not left, [(pid, open(f"/proc/{pid}/cmdline").read()[:80]) for pid, _ in left]


def test_guard_kills_its_processes_but_not_a_reused_pid():
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(3)]
    try:
        watched = [(p.pid, _stat(p.pid)[1]) for p in sleepers]
        reused = (watched[2][0], watched[2][1] + 1)  # same pid, another start time: not the process we saw
        guard = OrphanGuard([watched[0], watched[1], reused])
        guard.close()
        for p in sleepers[:2]:
            assert p.wait(timeout=30) == -signal.SIGKILL
        assert sleepers[2].poll() is None
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_descendants_lists_children_and_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '600'])"])
    try:
        deadline = time.monotonic() + 60
        while len(found := descendants(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        (grandchild, _), = found
        assert open(f"/proc/{grandchild}/comm").read().strip() == "sleep"
        assert child.pid in [pid for pid, _ in descendants(os.getpid())]
    finally:
        for pid, _ in descendants(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()

"""No orphan processes after a killed driver.

A locally started Ray runs as children of the driver (GCS, raylet, its agents, workers). When the driver is
killed with SIGKILL, the GCS, the raylet and the workers exit by themselves, but Ray 2.60's dashboard agent and
runtime-env agent hang in their exit path (they report the raylet's death to the dead GCS) and stay forever.
`OrphanGuard` is a small process in its own session that holds a pipe from the driver: when the pipe closes
(the driver exited, however it died), it kills the processes that Ray started at `ray.init` if they still
run. Each is identified by pid and start time, so a reused pid is never touched. Linux only (/proc).
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCH = r"""
import os, signal, sys, time
procs = [tuple(int(x) for x in arg.split(":")) for arg in sys.argv[2:]]
if sys.stdin.buffer.read() != b"clean":  # returns at EOF: the driver died, or said it shut Ray down
    time.sleep(float(sys.argv[1]))  # Ray's own exit first
for pid, started in procs:
    try:
        with open(f"/proc/{pid}/stat") as f:
            same = int(f.read().rsplit(")", 1)[1].split()[19]) == started
        if same:
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
"""


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc/<pid>/stat, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name (in parentheses) may hold spaces
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every descendant of `pid` now running."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            parents.setdefault(stat[0], []).append((int(name), stat[1]))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


class OrphanGuard:
    """Kills `processes` ((pid, start time) pairs) once this process exits or `close()` is called."""

    def __init__(self, processes: list[tuple[int, int]], grace_s: float = 2.0):
        args = [f"{pid}:{started}" for pid, started in processes]
        self.process = subprocess.Popen([sys.executable, "-c", _WATCH, str(grace_s), *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def close(self) -> None:
        """After a clean `ray.shutdown`: kill what is left now, and end the guard."""
        if self.process.poll() is None:
            self.process.stdin.write(b"clean")
            self.process.stdin.close()
            self.process.wait(timeout=30)


def guard_new_children(start) -> OrphanGuard | None:
    """Calls `start()` (e.g. ray.init) and guards the processes it left running as this process's descendants;
    no guard where /proc is missing."""
    if not os.path.isdir("/proc/self"):
        start()
        return None
    before = set(descendants(os.getpid()))
    start()
    return OrphanGuard([p for p in descendants(os.getpid()) if p not in before])

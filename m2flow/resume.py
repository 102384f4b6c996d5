"""Resumable runs: where periodic checkpoints live in a run directory, how one is written so that a kill at any
moment leaves the previous one valid, what the driver saves beside the trainers (step, prompt-sampler
position, RNG states, running totals), and which run `resume` continues.

A periodic checkpoint `checkpoints/step_NNNNNN/` holds the policy as an HF checkpoint (transformers loads it)
with the actor's sharded weights and optimizer state (trainer_dcp/) and trainer_state.pt, the critic's weights and
state in `critic/` (PPO only) and the driver's
`run_state.json`. It is written as `step_NNNNNN.tmp/` and renamed into place once complete; an old checkpoint
is renamed to `.old` before it is deleted. So a directory named `step_NNNNNN` (no dot) is always complete, and
a kill leaves at most a `.tmp` or `.old` behind, which the next start removes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
import socket
from typing import Callable

import numpy as np
import torch

from m2flow.io import atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
CRITIC = "critic"  # the critic's part of a checkpoint (a subdirectory)


class ResumeError(RuntimeError):
    """The run to resume does not exist or has no complete checkpoint."""


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step_{step:06d}")


def periodic_checkpoints(run_dir: str) -> list[str]:
    """Paths of the run's complete periodic checkpoints (`checkpoints/step_NNNNNN`), oldest first; a save in
    progress (`.tmp`) or being deleted (`.old`) is not one."""
    root = os.path.join(run_dir, CHECKPOINTS)
    names = sorted(d for d in os.listdir(root) if d.startswith("step_") and "." not in d) if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in names]


def _remove(path: str) -> None:
    """Deletes a checkpoint directory by first renaming it to `.old`: a kill midway never leaves a half-deleted
    directory under a complete checkpoint's name."""
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    shutil.rmtree(old, ignore_errors=True)


def clean_checkpoints(run_dir: str, keep_last: int) -> list[str]:
    """Removes what an interrupted save or rotation left (`*.tmp`, `*.old`) and the periodic checkpoints beyond
    the newest `keep_last` (0 = keep all). Returns the removed paths."""
    removed = sorted(glob.glob(os.path.join(run_dir, CHECKPOINTS, "*.tmp")) +
                     glob.glob(os.path.join(run_dir, CHECKPOINTS, "*.old")))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    extra = periodic_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []
    for path in extra:
        _remove(path)
    return removed + extra


def write_checkpoint(run_dir: str, step: int, write_parts: Callable[[str], None], run_state: dict,
                     keep_last: int) -> str:
    """Writes checkpoint `step`: `write_parts(tmp_dir)` writes the trainers' parts, then `run_state` goes to
    run_state.json, then the directory is renamed into place and old checkpoints beyond `keep_last` are
    removed. Returns the checkpoint's path."""
    final = step_dir(run_dir, step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_parts(tmp)
    atomic_write_text(os.path.join(tmp, RUN_STATE), json.dumps({"step": step, **run_state}))
    _sync_tree(tmp)  # the files are on disk before the rename makes the checkpoint visible
    if os.path.exists(final):
        _remove(final)
    os.replace(tmp, final)
    clean_checkpoints(run_dir, keep_last)
    return final


def _sync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def load_run_state(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, RUN_STATE)
    if not os.path.isfile(path):
        raise ResumeError(f"{path} is missing: {checkpoint} was not written by a resumable save (m2flow saves the run "
                          f"state in periodic checkpoints since issue 12); start a new run from its weights with "
                          f"model.path={checkpoint}")
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# The driver's random number generators, as JSON


def rng_state() -> dict:
    """The driver process's Python, NumPy and torch (CPU) RNG states, JSON-serialisable."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# Which run to continue


def run_status(run_dir: str) -> str | None:
    """running | completed | failed | interrupted (status.json; "running" also after a kill -9), or None."""
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            return json.load(f).get("status")
    except (OSError, ValueError):
        return None


def _still_running(run_dir: str) -> int | None:
    """The pid of the run's driver if status.json says running and that process is alive on this host."""
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("status") != "running" or record.get("host") != socket.gethostname() or not record.get("pid"):
        return None
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return int(record["pid"]) if int(record["pid"]) != os.getpid() else None


def find_run_to_resume(resume: str, output_dir: str, name: str) -> str | None:
    """The run directory that `resume` names: a path (which must hold a complete periodic checkpoint), or
    "auto": the newest run `<output_dir>/<name>-<time>` if it did not complete and has a checkpoint, else None
    (a fresh run). "" is None."""
    if not resume:
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise ResumeError(f"resume={resume}: no such run directory")
        if not periodic_checkpoints(resume):
            raise ResumeError(f"resume={resume}: no complete checkpoint in {os.path.join(resume, CHECKPOINTS)} "
                              f"(periodic checkpoints are written every checkpoint.every steps); nothing to resume")
        if pid := _still_running(resume):
            raise ResumeError(f"resume={resume}: that run is still running (pid {pid}); stop it first")
        if run_status(resume) == "completed":
            raise ResumeError(f"resume={resume}: that run completed (status.json); start a new run from its final "
                              f"weights with model.path={os.path.join(resume, CHECKPOINTS, 'final')}")
        return resume
    runs = sorted(d for d in glob.glob(os.path.join(output_dir, f"{glob.escape(name)}-*")) if os.path.isdir(d))
    if not runs:
        log.info("resume=auto: no earlier run named %r in %s; starting a new run", name, output_dir)
        return None
    newest = runs[-1]
    if pid := _still_running(newest):
        raise ResumeError(f"resume=auto: the newest run {newest} is still running (pid {pid}); "
                          f"stop it first, or give the new run another name")
    completed = run_status(newest) == "completed"
    if completed or not periodic_checkpoints(newest):
        log.info("resume=auto: the newest run %s %s; starting a new run", newest,
                 "completed" if completed else "has no complete checkpoint")
        return None
    return newest

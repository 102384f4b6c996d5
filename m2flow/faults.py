"""What a run does when something fails: a stage's exception becomes one line naming the stage and the worker
(StageError), repeated non-finite steps stop the run (NonFiniteTrainingError), and <run_dir>/status.json
says how the run ended and where to resume."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager

import ray

from m2flow.config import Config
from m2flow.io import atomic_write_text
from m2flow.resume import periodic_checkpoints


@contextmanager
def timer(times: dict[str, float], name: str):
    """Adds the block's wall time to times["time/<name>"] (so several generation rounds add up)."""
    start = time.perf_counter()
    yield
    times[f"time/{name}"] = times.get(f"time/{name}", 0.0) + time.perf_counter() - start


class StageError(RuntimeError):
    """A stage of the iteration failed: the message is one line naming the stage and the worker; the original
    error is `cause` (for a Ray worker, its remote traceback is in str(cause))."""

    def __init__(self, stage_name: str, cause: BaseException):
        self.stage, self.cause, self.worker = stage_name, cause, _worker_name(cause)
        self.run_dir: str | None = None  # set by run(): where status.json records the failure
        original = getattr(cause, "cause", None) or cause  # a RayTaskError carries the worker's exception
        first = (str(original).strip().splitlines() or [""])[0]
        super().__init__(f"stage '{stage_name}' failed in {self.worker}: {type(original).__name__}: {first}")


def _worker_name(e: BaseException) -> str:
    """Which worker raised: a Ray actor's method (and pid), a reward worker process, or the driver."""
    from m2flow.rewards.limits import RewardError

    if isinstance(e, ray.exceptions.RayTaskError):
        title, pid = getattr(e, "proctitle", None) or getattr(e, "function_name", None), getattr(e, "pid", None)
        if not title:  # an instance of its cause's class too (ray.get makes them) keeps them only in its text
            found = re.search(r"ray::([\w.]+\(\))\S* \(pid=(\d+)", str(e))
            title, pid = found.groups() if found else ("a Ray worker", None)
        title = title.removeprefix("ray::")
        return f"{title} (pid {pid})" if pid else title
    if isinstance(e, ray.exceptions.RayActorError):  # its process died: killed (OOM killer, kill -9) or crashed
        fields = dict(re.findall(r"^\s*(class_name|pid): (\S+)$", str(e), re.MULTILINE))
        if "class_name" in fields:
            return f"{fields['class_name']} (pid {fields.get('pid', '?')}), whose process died"
        return "a Ray actor whose process died" + (f" ({e.actor_id})" if getattr(e, "actor_id", None) else "")
    if isinstance(e, RewardError):
        return "a reward worker process"
    return "the driver"


@contextmanager
def stage(times: dict[str, float], name: str):
    """`timer(times, name)`, and an exception inside becomes a StageError naming the stage and the worker."""
    with timer(times, name):
        try:
            yield
        except (StageError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise StageError(name, e) from e


def write_status(run_dir: str, status: str, error: BaseException | None = None) -> None:
    """<run_dir>/status.json: running | completed | failed | interrupted, the error (stage, worker, message),
    the last periodic checkpoint (where to resume from) and the driver's host and pid."""
    periodic = periodic_checkpoints(run_dir)
    record: dict = {"status": status, "last_checkpoint": periodic[-1] if periodic else None,
                    "host": socket.gethostname(), "pid": os.getpid()}
    if error is not None:
        record |= {"error": str(error), "error_type": type(error).__name__,
                   "stage": getattr(error, "stage", None), "worker": getattr(error, "worker", None)}
    atomic_write_text(os.path.join(run_dir, "status.json"), json.dumps(record, indent=2))


class NonFiniteTrainingError(RuntimeError):
    """train.max_bad_steps optimizer steps in a row had a non-finite loss or gradient norm."""


def check_bad_steps(metrics: dict[str, float], step: int, cfg: Config) -> None:
    """Stops the run (NonFiniteTrainingError naming the step) once the actor or the critic has skipped
    train.max_bad_steps optimizer steps in a row for a non-finite loss or gradient norm."""
    for trainer, lr in (("actor", cfg.train.lr), ("critic", cfg.critic.lr)):
        bad = int(metrics.get(f"{trainer}/bad_steps_in_a_row", 0))
        if bad >= cfg.train.max_bad_steps:
            raise NonFiniteTrainingError(
                f"RL step {step}: the {trainer}'s last {bad} optimizer steps had a non-finite loss or gradient norm "
                f"(train.max_bad_steps={cfg.train.max_bad_steps}); they were skipped, so its weights are those of "
                f"the last good step. Lower the learning rate (now {lr:g}) or look for non-finite rewards or "
                f"advantages in metrics.jsonl")

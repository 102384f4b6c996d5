"""Resumable-run bookkeeping (issue 12): checkpoint rotation that survives SIGKILL at any point of a save, the
driver's RNG and prompt-sampler state, metrics truncation on resume, and which run `resume` continues."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from m2flow.metrics import MetricsLogger, read_metrics
from m2flow.resume import (
    RUN_STATE,
    ResumeError,
    clean_checkpoints,
    find_run_to_resume,
    load_run_state,
    periodic_checkpoints,
    rng_state,
    set_rng_state,
    step_dir,
    write_checkpoint,
)
from m2flow.data.task import PromptSampler


def _parts(tmp: str) -> None:
    """Stands in for the trainers' parts: a 4 MB weights file and a critic subdirectory."""
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(os.urandom(4 << 20))
    os.makedirs(os.path.join(tmp, "critic"))
    with open(os.path.join(tmp, "critic", "trainer_state.pt"), "wb") as f:
        f.write(b"x" * 1000)


def _is_complete(path: str) -> bool:
    return (os.path.getsize(os.path.join(path, "model.safetensors")) == 4 << 20
            and json.loads(open(os.path.join(path, RUN_STATE)).read())["step"] == int(path[-6:]))


# Each kill point: code run in a child process before it saves step 6 (steps 2 and 4 exist, keep_last=2); the
# patched function sends SIGKILL to its own process at that moment of the save.
KILL_POINTS = {
    "while writing the weights": "m2flow_parts = lambda tmp: (open(os.path.join(tmp, 'model.safetensors'), 'wb')"
                                 ".write(b'half'), os.kill(os.getpid(), 9))",
    "before the run state": "resume.atomic_write_text = lambda *a: os.kill(os.getpid(), 9)",
    "before the rename": "resume._sync_tree = lambda *a: os.kill(os.getpid(), 9)",
    "while deleting the oldest": "_replace = os.replace\n"  # killed once step 2 is renamed to step_000002.old
                                 "os.replace = lambda a, b: (_replace(a, b), b.endswith('.old') and os.kill(os.getpid(), 9))",
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_at_any_point_of_a_save_leaves_a_valid_checkpoint(tmp_path, point):
    run_dir = str(tmp_path)
    for step in (2, 4):
        write_checkpoint(run_dir, step, _parts, {"x": step}, keep_last=2)
    code = "\n".join([
        "import os, sys", f"sys.path.insert(0, {os.path.dirname(__file__)!r})",
        "from m2flow import resume", "from test_resume import _parts as m2flow_parts",
        KILL_POINTS[point],
        f"resume.write_checkpoint({run_dir!r}, 6, m2flow_parts, {{'x': 6}}, keep_last=2)",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    complete = periodic_checkpoints(run_dir)
    assert complete and all(_is_complete(p) for p in complete)  # whatever is listed is whole
    if point == "while deleting the oldest":
        assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_000002.old"))  # killed mid-deletion
    newest_expected = 6 if point == "while deleting the oldest" else 4
    assert complete[-1] == step_dir(run_dir, newest_expected)
    clean_checkpoints(run_dir, keep_last=2)  # what a resumed run does first
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == sorted(
        os.path.basename(p) for p in periodic_checkpoints(run_dir))  # no .tmp or .old left
    assert len(periodic_checkpoints(run_dir)) == 2
    assert load_run_state(periodic_checkpoints(run_dir)[-1])["x"] == newest_expected


def test_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        write_checkpoint(str(tmp_path), step, _parts, {}, keep_last=2)
    assert [os.path.basename(p) for p in periodic_checkpoints(str(tmp_path))] == ["step_000003", "step_000004"]
    for step in (5, 6):
        write_checkpoint(str(tmp_path), step, _parts, {}, keep_last=0)  # 0 keeps all
    assert len(periodic_checkpoints(str(tmp_path))) == 4


def test_rng_state_roundtrip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_prompt_sampler_resumes_mid_epoch():
    straight = PromptSampler(7, seed=5)
    first = straight.next(4)
    state = json.loads(json.dumps(straight.state()))
    resumed = PromptSampler(7, seed=5)
    resumed.load_state(state)
    assert [resumed.next(3) for _ in range(5)] == [straight.next(3) for _ in range(5)]
    assert len(set(first)) == 4  # within an epoch, no repeats
    with pytest.raises(ValueError, match="saved over 7 training problems, but the data now has 8"):
        PromptSampler(8, seed=5).load_state(state)


def test_metrics_logger_drops_rows_after_the_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for step in range(5):
        log.log(step, {"a": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "a"')  # a row cut short by the kill
    log = MetricsLogger(str(tmp_path), tensorboard=False, resume_after=2)
    log.log(3, {"a": 30.0})
    log.close()
    assert [(r["step"], r["a"]) for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def _fake_run(root, name: str, status: str | None, steps=(2,), pid: int | None = None) -> str:
    run_dir = str(root / name)
    os.makedirs(run_dir)
    for step in steps:
        write_checkpoint(run_dir, step, lambda tmp: None, {}, keep_last=0)
    if status:
        import socket

        record = {"status": status, "host": socket.gethostname(), "pid": pid or 1 << 22}
        (root / name / "status.json").write_text(json.dumps(record))
    return run_dir


def test_resume_auto_picks_the_newest_unfinished_run(tmp_path):
    assert find_run_to_resume("", str(tmp_path), "exp") is None
    assert find_run_to_resume("auto", str(tmp_path), "exp") is None  # nothing yet: a new run
    _fake_run(tmp_path, "exp-20260101-000000", "failed")
    newest = _fake_run(tmp_path, "exp-20260102-000000", "running")  # killed -9: still says running, pid gone
    _fake_run(tmp_path, "other-20260103-000000", "failed")
    assert find_run_to_resume("auto", str(tmp_path), "exp") == newest
    _fake_run(tmp_path, "exp-20260104-000000", None, steps=())  # killed before its first checkpoint
    assert find_run_to_resume("auto", str(tmp_path), "exp") is None
    _fake_run(tmp_path, "exp-20260105-000000", "completed")
    assert find_run_to_resume("auto", str(tmp_path), "exp") is None


def test_resume_refuses_completed_live_and_empty_runs(tmp_path):
    done = _fake_run(tmp_path, "a", "completed")
    with pytest.raises(ResumeError, match="that run completed.*model.path="):
        find_run_to_resume(done, str(tmp_path), "a")
    live = _fake_run(tmp_path, "b", "running", pid=os.getppid())  # a live process on this host
    with pytest.raises(ResumeError, match=f"still running \\(pid {os.getppid()}\\)"):
        find_run_to_resume(live, str(tmp_path), "b")
    empty = _fake_run(tmp_path, "c", "failed", steps=())
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        find_run_to_resume(empty, str(tmp_path), "c")

"""Worker faults (issue 12): a stage that raises stops the run with one line naming the stage and the worker,
the original error below it, a non-zero exit, and <run_dir>/status.json saying that (and where) it failed."""

from __future__ import annotations

import json
import os

import pytest
import ray

from m2flow.rewards import REWARDS, register_reward
from m2flow.rewards.limits import RewardError
from m2flow.faults import StageError, stage, write_status

EVAL_PROBLEMS = 8


def _micro(tmp_path, reward: str) -> list[str]:
    """A 2-step run of a micro model scored by `reward` (one reward worker, so its call count is the run's)."""
    return ["base.hidden_size=32", "base.num_layers=2", "base.num_heads=4", "base.num_kv_heads=2",
            "base.intermediate_size=64", "base.sft_examples=32", "base.sft_steps=2", "base.sft_batch_size=16",
            "data.synthetic_train_size=32", "data.synthetic_eval_size=8", f"eval.num_problems={EVAL_PROBLEMS}",
            "eval.max_new_tokens=8", "rollout.max_new_tokens=8", "rollout.n=2", "train.prompts_per_step=2",
            "train.micro_batch_size=4", "train.steps=2", "cluster.num_cpus=2", "reward.workers=1",
            f"reward.name={reward}", f"output_dir={tmp_path / 'runs'}", f"base.cache_dir={tmp_path / 'cache'}"]
CALLS = "M2FLOW_TEST_REWARD_CALLS"  # a file counting this run's reward calls, one byte each


def _count_call() -> int:
    """This run's reward calls so far, this one included: counted in the file the test names in $CALLS, so the
    count survives a reward worker being replaced (as one that ran past its time limit on a busy machine is)."""
    with open(os.environ[CALLS], "a") as f:
        f.write("x")
    return os.path.getsize(os.environ[CALLS])


def reward_failing_after_eval(response: str, ground_truth: str, **_options) -> float:
    """Scores the held-out evaluation (EVAL_PROBLEMS calls, one reward worker), then raises in training."""
    if _count_call() > EVAL_PROBLEMS:
        raise ValueError("injected reward fault")
    return 0.0


if "faults_raising" not in REWARDS:
    register_reward("faults_raising")(reward_failing_after_eval)


def test_stage_error_names_the_stage_and_a_ray_worker():
    cause = ValueError("boom in update")
    remote = ray.exceptions.RayTaskError("ActorWorker.update", "Traceback ...\nValueError: boom in update", cause,
                                         proctitle="ray::ActorWorker.update()", pid=4242)
    with pytest.raises(StageError) as err:
        with stage({}, "update"):
            raise remote
    assert str(err.value) == "stage 'update' failed in ActorWorker.update() (pid 4242): ValueError: boom in update"
    assert err.value.cause is remote and err.value.stage == "update"


def test_stage_error_names_the_worker_of_an_error_ray_made_an_instance_of_its_cause():
    """ray.get raises a worker's error as an instance of both RayTaskError and the cause's class, which keeps the
    worker's name and pid only in its text (the colors included)."""
    cause = ValueError("boom in generate")
    remote = ray.exceptions.RayTaskError(
        "RolloutWorker.generate", "Traceback ...\nValueError: boom in generate", cause,
        proctitle="ray::RolloutWorker.generate()", pid=77).as_instanceof_cause()
    assert isinstance(remote, ValueError)
    with pytest.raises(StageError) as err:
        with stage({}, "rollout"):
            raise remote
    assert str(err.value).startswith("stage 'rollout' failed in RolloutWorker.generate() (pid 77): ValueError")


def test_stage_error_names_reward_workers_and_keeps_timing():
    times: dict[str, float] = {}
    with pytest.raises(StageError, match="stage 'reward' failed in a reward worker process: RewardError: bad"):
        with stage(times, "reward"):
            raise RewardError("bad\ntraceback")
    assert "time/reward" not in times  # a failed stage is not timed
    with stage(times, "rollout"):
        pass
    assert times["time/rollout"] >= 0


def test_status_file_records_failure_and_last_checkpoint(tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "step_000002")
    os.makedirs(tmp_path / "checkpoints" / "step_000004.tmp")  # an unfinished save is not a place to resume
    write_status(str(tmp_path), "failed", StageError("update", ValueError("x")))
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and status["stage"] == "update" and status["worker"] == "the driver"
    assert status["last_checkpoint"].endswith("step_000002") and "ValueError: x" in status["error"]


def test_failing_reward_worker_stops_the_run(tmp_path, capsys, monkeypatch):
    """End to end through Ray and the CLI on a micro model: one line, the original error, exit 1, status.json."""
    monkeypatch.setenv(CALLS, str(tmp_path / "reward-calls"))  # (the reward workers inherit it)
    from m2flow.cli import main

    micro = _micro(tmp_path, "faults_raising")
    assert main(["train", *micro, "--no-progress"]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("m2flow: run failed:"))
    assert "stage 'reward' failed in a reward worker process" in line
    assert "ValueError: injected reward fault" in err.split(line, 1)[1]  # the original error below the line
    (run_dir,) = os.listdir(tmp_path / "runs")
    status = json.loads((tmp_path / "runs" / run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["stage"] == "reward"


def _kill_at_training_rewards(process: str) -> float:
    """Counts a reward call; at every training reward (after the held-out evaluation's), kills this run's Ray
    workers whose process name starts with `process` with SIGKILL (as the OOM killer would): the next stage that
    needs them finds them dead."""
    import signal

    from m2flow.scheduler.orphans import descendants

    if _count_call() > EVAL_PROBLEMS:  # this run's workers only: descendants of the driver (our parent)
        for pid, _ in descendants(os.getppid()):
            try:
                if open(f"/proc/{pid}/comm").read().startswith(process):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0.0


def reward_killing_the_trainer(response: str, ground_truth: str, **_options) -> float:
    return _kill_at_training_rewards("ray::ActorWorke")


def reward_killing_the_rollout(response: str, ground_truth: str, **_options) -> float:
    return _kill_at_training_rewards("ray::RolloutWor")


if "faults_killing" not in REWARDS:
    register_reward("faults_killing")(reward_killing_the_trainer)
    register_reward("faults_killing_rollout")(reward_killing_the_rollout)


def test_killed_trainer_worker_stops_the_run(tmp_path, capsys, monkeypatch):
    """A worker killed (not raising) mid-run: the run stops with one line naming the stage and the dead worker,
    exit 1, status.json says failed; the Ray processes are gone afterwards (no orphans)."""
    monkeypatch.setenv(CALLS, str(tmp_path / "reward-calls"))  # (the reward workers inherit it)
    from m2flow.cli import main
    from m2flow.scheduler.orphans import descendants

    micro = _micro(tmp_path, "faults_killing")
    before = set(descendants(os.getpid()))
    assert main(["train", *micro, "--no-progress"]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("m2flow: run failed:"))
    # the first stage that calls the trainer after the kill (rewards are all 0: no informative group to train on):
    # collecting the step's timeline from every worker
    assert "stage 'timeline' failed in ActorWorker (pid " in line and "whose process died: ActorDiedError" in line
    (run_dir,) = os.listdir(tmp_path / "runs")
    status = json.loads((tmp_path / "runs" / run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["stage"] == "timeline"
    assert set(descendants(os.getpid())) <= before  # Ray and the reward workers are gone


@pytest.mark.parametrize("reward,worker", [("faults_killing", "ActorWorker"),
                                           ("faults_killing_rollout", "RolloutWorker")])
def test_killed_worker_stops_a_pipelined_run(tmp_path, capsys, monkeypatch, reward, worker):
    """Disaggregated and pipelined (rollout on device 0, trainer on device 1, groups streamed through a channel):
    a worker killed mid-run stops the run well within the channel's timeout, with one line naming the stage and
    the dead worker, exit 1, status.json failed, and no Ray process left behind."""
    monkeypatch.setenv(CALLS, str(tmp_path / "reward-calls"))  # (the reward workers inherit it)
    import time

    from m2flow.cli import main
    from m2flow.scheduler.orphans import descendants

    micro = _micro(tmp_path, reward) + ["cluster.devices=2", "cluster.placement=disaggregated", "rollout.n=2",
                                        "train.prompts_per_step=4", "train.micro_batch_size=2"]
    before = set(descendants(os.getpid()))
    began = time.monotonic()
    assert main(["train", *micro, "--no-progress"]) == 1
    assert time.monotonic() - began < 300  # the channel's timeout is 600 s: a lost producer does not hang the run
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("m2flow: run failed:"))
    assert f"failed in {worker} (pid " in line and "whose process died" in line, line
    (run_dir,) = os.listdir(tmp_path / "runs")
    status = json.loads((tmp_path / "runs" / run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["stage"]
    assert set(descendants(os.getpid())) <= before

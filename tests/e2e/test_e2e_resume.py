"""Exact resume (issue 12): PPO with a critic and a reference model (every part of the state that matters) on a
micro model. A run of 4 steps straight, and the same run killed with SIGKILL once its step-2 checkpoint exists,
then resumed with `m2flow train --resume RUN_DIR`: the same metrics at every step and the same final weights,
to the last bit. Also with the trainer on 2 ranks and 2 engine replicas on 2 logical devices (issue 14; marked
slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from m2flow.cli import main
from m2flow.config import load_config
from m2flow.metrics import read_metrics
from m2flow.runner import run

from test_e2e_grpo import MICRO  # also registers the e2e_has_digit reward (tests/e2e is on sys.path)

E2E_DIR = os.path.dirname(os.path.abspath(__file__))
RESUME = [o for o in MICRO if not o.startswith(("checkpoint.", "train.steps"))] + [
    "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=1", "eval.every=2", "train.warmup_steps=3",
    "algorithm.advantage=gae", "algorithm.kl_coef=0.05", "critic.lr=1e-3", "algorithm.whiten_advantages=true",
    "eval.num_problems=8",
]
# wall-clock and memory measurements differ between any two runs
VOLATILE = ("time/", "throughput/", "rollout/engine_seconds", "weight_sync/gb_per_s", "memory/")


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _run_and_kill_after_step_2(overrides: list[str], root) -> str:
    """Starts `m2flow train` in its own process group and kills the group with SIGKILL as soon as the step-2
    checkpoint is complete (the run is then in step 3). Returns the run directory."""
    code = (f"import sys; sys.path.insert(0, {E2E_DIR!r}); import test_e2e_grpo; from m2flow.cli import main; "
            f"sys.exit(main(['train', *{overrides!r}, '--no-progress']))")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = root / "runs"
    deadline = time.monotonic() + 600  # a safety net against a hung child, not a timing assertion
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("killed-*/checkpoints/step_000002")) if runs.exists() else []
            if found:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return str(found[0].parent.parent)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the run ended (rc {proc.returncode}) before its step-2 checkpoint: {proc.stderr.read()}")


TWO_RANKS = ["train.ranks=2", "rollout.replicas=2", f"cluster.devices={min(2, len(os.sched_getaffinity(0)))}"]


# the two-rank variant takes about 3.5 minutes on 2 cores: `make test-slow`
@pytest.fixture(scope="module", params=[pytest.param([], id="one-rank"),
                                        pytest.param(TWO_RANKS, id="two-ranks", marks=pytest.mark.slow)])
def runs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("e2e_resume")
    common = RESUME + request.param + [f"output_dir={root / 'runs'}", f"base.cache_dir={root / 'cache'}"]
    straight = run(load_config(None, common + ["name=straight"]), progress=False)
    killed_dir = _run_and_kill_after_step_2(common + ["name=killed"], root)
    killed_rows = read_metrics(os.path.join(killed_dir, "metrics.jsonl"))
    assert main(["train", "--resume", killed_dir, "--no-progress"]) == 0
    return straight["run_dir"], killed_dir, killed_rows


def test_resumed_run_matches_the_straight_run(runs):
    straight_dir, resumed_dir, _ = runs
    straight = read_metrics(os.path.join(straight_dir, "metrics.jsonl"))
    resumed = read_metrics(os.path.join(resumed_dir, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # every step once, in order
    assert _comparable(resumed) == _comparable(straight)
    assert any("critic/value_loss" in r for r in straight) and any("actor/kl" in r for r in straight)
    a = load_file(os.path.join(straight_dir, "checkpoints", "final", "model.safetensors"))
    b = load_file(os.path.join(resumed_dir, "checkpoints", "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_records_where_it_came_from(runs):
    _, resumed_dir, killed_rows = runs
    summary = json.loads(open(os.path.join(resumed_dir, "summary.json")).read())
    assert summary["resumed_from"].endswith("step_000002") and summary["rl_steps"] == 4
    status = json.loads(open(os.path.join(resumed_dir, "status.json")).read())
    assert status["status"] == "completed"
    # the killed run had logged past its checkpoint (or not); either way the resumed log has each step once
    assert max(r["step"] for r in killed_rows) >= 2
    names = sorted(os.listdir(os.path.join(resumed_dir, "checkpoints")))
    assert names == ["final", "step_000002"]  # keep_last=1; no .tmp or .old left behind


def test_resume_errors(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "resume must be '', 'auto' or a run directory" in capsys.readouterr().err
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err

"""When a pipelined placement can stream micro-batches into the update (pipeline.streamable), and why not."""

from __future__ import annotations

from m2flow.config import load_config
from m2flow.pipeline import streamable


def test_streams_group_local_advantages_and_says_why_not_otherwise():
    assert streamable(load_config(None, []), rollout_old=True) == ""
    for override, reason in [("algorithm.advantage=reinforce_pp", "not a function of one group"),
                             ("algorithm.whiten_advantages=true", "whole batch"),
                             ("train.epochs=2", "train.epochs > 1")]:
        assert reason in streamable(load_config(None, [override]), rollout_old=True), override


def test_several_mini_batches_need_old_logprobs_from_the_step_start_weights():
    cfg = load_config(None, ["train.mini_batches=2"])
    assert streamable(cfg, rollout_old=True) == ""  # the engine's
    assert "give `inference` devices of its own" in streamable(cfg, rollout_old=False)  # the actor's, mid-step
    assert streamable(cfg, rollout_old=False, inference_apart=True) == ""  # an inference group's, synced per step

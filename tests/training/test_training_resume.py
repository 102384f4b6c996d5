"""A trainer's resumable state (issue 12): save after k updates, load into a fresh trainer, and the next updates
are bit-identical to those of the trainer that never stopped: weights, AdamW moments, LR schedule, RNG."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from m2flow.training.checkpoint import SHARDED, TRAINER_STATE, WEIGHTS, load_trainer, save_trainer

from test_training_actor import _actor, _prepared, rollout  # noqa: F401 (the module-scoped batch fixture)


@pytest.fixture(scope="module")
def base_model(make_micro_model):
    return make_micro_model(0)


def _weights(actor) -> dict[str, torch.Tensor]:
    return actor.state_dict()


@pytest.mark.parametrize("fsdp", [False, True])
def test_resumed_trainer_continues_bit_identically(tmp_path, base_model, rollout, tokenizer, fsdp):  # noqa: F811
    # warm-up of 3 steps: the LR schedule is mid-ramp at the save, so a lost schedule would show
    options = {"fsdp": fsdp, "warmup_steps": 3, "mini_batches": 2}
    straight = _actor(copy.deepcopy(base_model), **options)
    straight.update(_prepared(straight, rollout))
    save_trainer(str(tmp_path), straight, tokenizer)
    assert {WEIGHTS, TRAINER_STATE, SHARDED, "config.json"} <= set(os.listdir(tmp_path))
    after_one = _weights(straight)

    resumed = _actor(copy.deepcopy(base_model), **options)  # a fresh trainer from the starting weights
    load_trainer(str(tmp_path), resumed)
    assert all(torch.equal(after_one[k], v) for k, v in _weights(resumed).items())
    for _ in range(2):
        m_straight = straight.update(_prepared(straight, rollout))
        m_resumed = resumed.update(_prepared(resumed, rollout))
        assert m_straight == m_resumed  # same loss, grad norm, lr, clip fractions, to the last bit
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], after_one["model.embed_tokens.weight"])


def test_a_fresh_optimizer_differs(tmp_path, base_model, rollout, tokenizer):  # noqa: F811
    """The check above can fail: restoring only the weights (not Adam's moments or the schedule) diverges."""
    straight = _actor(copy.deepcopy(base_model), warmup_steps=3)
    straight.update(_prepared(straight, rollout))
    weights_only = _actor(copy.deepcopy(base_model), warmup_steps=3)
    weights_only.model.load_state_dict(straight.model.state_dict())
    straight.update(_prepared(straight, rollout))
    weights_only.update(_prepared(weights_only, rollout))
    a, b = _weights(straight), _weights(weights_only)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_bad_step_count_and_rng_are_restored(tmp_path, base_model, tokenizer):
    actor = _actor(copy.deepcopy(base_model))
    actor.bad_steps_in_a_row = 2
    torch.manual_seed(123)
    save_trainer(str(tmp_path), actor, tokenizer)
    expected = torch.rand(3)
    other = _actor(copy.deepcopy(base_model))
    torch.manual_seed(0)
    load_trainer(str(tmp_path), other)
    assert other.bad_steps_in_a_row == 2 and torch.equal(torch.rand(3), expected)


def test_weights_only_checkpoint_cannot_resume(tmp_path, base_model, tokenizer):
    from m2flow.training.checkpoint import save_hf_checkpoint

    actor = _actor(copy.deepcopy(base_model))
    save_hf_checkpoint(str(tmp_path / "final"), actor.hf_config, actor.state_dict(), tokenizer)
    with pytest.raises(FileNotFoundError, match="trainer_state.pt or .*trainer_dcp is missing.*weights only"):
        load_trainer(str(tmp_path / "final"), actor)

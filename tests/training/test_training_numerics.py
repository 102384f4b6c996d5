"""Numerics faults (issue 12): a non-finite loss or gradient norm skips the optimizer step and is counted;
train.max_bad_steps in a row stop the run naming the step; a checkpoint never holds a non-finite weight."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, Config, CriticConfig, TrainConfig
from m2flow.rollout.types import Sample
from m2flow.faults import NonFiniteTrainingError, check_bad_steps
from m2flow.training.actor import Actor
from m2flow.training.checkpoint import NonFiniteWeightsError, save_hf_checkpoint
from m2flow.training.critic import Critic


@pytest.fixture(scope="module")
def batch(tokenizer):
    """4 sequences, 2 groups, ragged, with advantages and old logprobs filled in later."""
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_index=i // 2, prompt_ids=torch.randint(40, 120, (p,), generator=gen).tolist(),
                      token_ids=torch.randint(40, 120, (t,), generator=gen).tolist(), logprobs=[-1.0] * t,
                      finish_reason="stop") for i, (p, t) in enumerate([(3, 4), (5, 2), (4, 5), (2, 3)])]
    b = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    b.scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    b.advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    return b


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _actor(model, lr: float, batch: RolloutBatch) -> tuple[Actor, RolloutBatch]:
    actor = Actor(model, TrainConfig(fsdp=False, lr=lr, mini_batches=2, micro_batch_size=2), AlgorithmConfig())
    b = copy.deepcopy(batch)
    b.old_logprobs = actor.compute_logprobs(b)
    return actor, b


def test_non_finite_loss_skips_the_step_and_counts_it(make_micro_model, batch):
    actor, b = _actor(make_micro_model(0), 1e-3, batch)
    before = _weights(actor.model)
    b.advantages = torch.tensor([float("nan"), -1.0, -1.0, 1.0])  # a NaN reward made it into the advantages
    out = actor.update(b)
    assert out["actor/skipped_steps"] == 1  # the other mini-batch is fine and steps
    b.advantages = torch.full((4,), float("nan"))
    out = actor.update(b)
    assert out["actor/skipped_steps"] == 2 and out["actor/bad_steps_in_a_row"] >= 2
    after = _weights(actor.model)
    assert all(torch.isfinite(v).all() for v in after.values())
    b.advantages = batch.advantages.clone()
    assert actor.update(b)["actor/bad_steps_in_a_row"] == 0  # a good step resets the run of bad ones
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the good first mini-batch did step


def test_huge_learning_rate_never_makes_weights_non_finite(make_micro_model, batch):
    actor, b = _actor(make_micro_model(0), 1e30, batch)
    skipped = 0
    for _ in range(3):
        out = actor.update(b)
        skipped += out["actor/skipped_steps"]
        assert all(torch.isfinite(v).all() for v in actor.state_dict().values())
    assert skipped >= 4 and out["actor/bad_steps_in_a_row"] >= 4  # after the first diverging step, all skipped
    with pytest.raises(NonFiniteTrainingError, match=r"RL step 7: the actor's last \d+ optimizer steps.*learning rate"):
        check_bad_steps(out, 7, Config())


def test_critic_skips_non_finite_steps(make_micro_model, batch):
    from transformers import AutoModelForTokenClassification

    config = copy.deepcopy(make_micro_model(0).config)
    config.num_labels = 1
    model = AutoModelForTokenClassification.from_config(config)
    critic = Critic(model, TrainConfig(fsdp=False), CriticConfig(lr=1e-2), AlgorithmConfig(advantage="gae"))
    b = copy.deepcopy(batch)
    b.values = critic.compute_values(b)
    b.returns = torch.full_like(b.values, float("inf"))
    before = _weights(critic.model)
    out = critic.update(b)
    assert out["critic/skipped_steps"] == 1 and out["critic/bad_steps_in_a_row"] == 1
    assert all(torch.equal(before[k], v) for k, v in _weights(critic.model).items())


def test_check_bad_steps_stops_at_max_bad_steps():
    cfg = Config()
    check_bad_steps({"actor/bad_steps_in_a_row": 2.0}, 5, cfg)  # below train.max_bad_steps=3: carry on
    with pytest.raises(NonFiniteTrainingError, match="RL step 6: the critic's last 3"):
        check_bad_steps({"actor/bad_steps_in_a_row": 0.0, "critic/bad_steps_in_a_row": 3.0}, 6, cfg)


def test_checkpoint_refuses_non_finite_weights(tmp_path, make_micro_model, tokenizer):
    model = make_micro_model(0)
    path = str(tmp_path / "final")
    save_hf_checkpoint(path, model.config, model.state_dict(), tokenizer)
    good = os.listdir(path)
    state = model.state_dict()
    state["model.norm.weight"] = state["model.norm.weight"].clone().fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="refusing to save.*model.norm.weight"):
        save_hf_checkpoint(path, model.config, state, tokenizer)
    assert os.listdir(path) == good and sorted(os.listdir(tmp_path)) == ["final"]  # the old one is untouched

"""Critic (PPO's value model): loading from a policy checkpoint, values of response tokens, the update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from m2flow.algorithms import gae_advantages, scores_to_token_rewards, value_loss
from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, CriticConfig, TrainConfig
from m2flow.rollout.types import Sample
from m2flow.training.critic import Critic, load_value_model, response_values


@pytest.fixture(scope="module")
def policy_dir(make_micro_model, tokenizer, tmp_path_factory):
    from m2flow.training.checkpoint import save_hf_checkpoint

    model = make_micro_model(0)
    path = str(tmp_path_factory.mktemp("policy"))
    save_hf_checkpoint(path, model.config, model.state_dict(), tokenizer)
    return path, model


@pytest.fixture(scope="module")
def batch(tokenizer):
    """6 sequences, ragged prompts and responses, outcome scores, GAE returns of zero values."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i, (p, t) in enumerate([(3, 4), (6, 2), (4, 5), (5, 1), (2, 3), (7, 4)]):
        samples.append(Sample(prompt_index=i // 2, prompt_ids=torch.randint(40, 120, (p,), generator=gen).tolist(),
                              token_ids=torch.randint(40, 120, (t,), generator=gen).tolist(), logprobs=[-1.0] * t,
                              finish_reason="stop"))
    b = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    b.scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    return b


def _critic(model, lr=1e-2, value_clip=None, **train):
    return Critic(model, TrainConfig(**{"fsdp": False, **train}), CriticConfig(lr=lr),
                  AlgorithmConfig(advantage="gae", value_clip=value_clip))


def _with_targets(critic, batch):
    b = copy.deepcopy(batch)
    b.values = critic.compute_values(b)
    b.advantages, b.returns = gae_advantages(scores_to_token_rewards(b.scores, b.response_mask), b.values,
                                             b.response_mask)
    return b


def test_value_model_keeps_the_policy_body_and_starts_at_zero(policy_dir, batch):
    path, policy = policy_dir
    model = load_value_model(path)
    body = {k: v for k, v in policy.state_dict().items() if k.startswith("model.")}
    for k, v in body.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.score.weight.shape == (1, policy.config.hidden_size)
    values = _critic(model).compute_values(batch)
    assert values.shape == batch.response_mask.shape
    assert (values == 0).all()


def test_values_are_masked_and_match_the_forward(policy_dir, batch):
    model = load_value_model(policy_dir[0])
    torch.nn.init.normal_(model.score.weight, std=0.5)
    critic = _critic(model, micro_batch_size=4)  # two micro-batches, the last partial
    values = critic.compute_values(batch)
    mask = batch.response_mask.bool()
    assert (values[~mask] == 0).all() and (values[mask] != 0).all()
    with torch.no_grad():
        want = response_values(model.eval(), batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
    torch.testing.assert_close(values[mask], want[mask], atol=1e-5, rtol=0)
    # one sequence alone (no padding) gets the same values: left padding does not shift positions
    alone = critic.compute_values(RolloutBatch.concat([batch.select(slice(1, 2))], 0))
    one = batch.select(slice(1, 2))
    trimmed = RolloutBatch(one.input_ids[:, one.attention_mask[0].argmax():], one.attention_mask[:, one.attention_mask[0].argmax():],
                           one.response_mask, one.rollout_logprobs, one.group_ids)
    torch.testing.assert_close(critic.compute_values(trimmed)[0, :2], alone[0, :2], atol=1e-5, rtol=0)


def test_one_update_lowers_the_value_loss(policy_dir, batch):
    critic = _critic(load_value_model(policy_dir[0]), lr=1e-2, micro_batch_size=4)
    b = _with_targets(critic, batch)
    before, _ = value_loss(critic.compute_values(b), b.values, b.returns, b.response_mask)
    metrics = critic.update(b)
    after, _ = value_loss(critic.compute_values(b), b.values, b.returns, b.response_mask)
    assert float(after) < float(before)
    for key in ("critic/value_loss", "critic/vf_explained_var", "critic/vf_clip_frac", "critic/grad_norm", "critic/lr"):
        assert key in metrics, key
    assert metrics["critic/value_loss"] == pytest.approx(float(before), rel=1e-5)
    assert metrics["critic/lr"] == pytest.approx(1e-2)


def test_value_clip_limits_the_move(policy_dir, batch):
    """With a tiny clip range the clipped branch is taken once values moved past it (second epoch)."""
    critic = _critic(load_value_model(policy_dir[0]), lr=1e-1, value_clip=1e-4, epochs=2)
    metrics = critic.update(_with_targets(critic, batch))
    assert metrics["critic/vf_clip_frac"] > 0


def test_gradient_accumulation_matches_one_micro_batch(policy_dir, batch):
    states = []
    for mbs in (len(batch), 2):
        critic = _critic(load_value_model(policy_dir[0]), micro_batch_size=mbs)
        critic.update(_with_targets(critic, batch))
        states.append(critic.state_dict())
    assert max((states[0][k] - states[1][k]).abs().max().item() for k in states[0]) < 1e-6


def test_activation_checkpointing_gives_the_same_update(policy_dir, batch):
    states = []
    for checkpointing in (False, True):
        critic = _critic(load_value_model(policy_dir[0]), micro_batch_size=2, activation_checkpointing=checkpointing)
        assert critic.model.is_activation_checkpointing == checkpointing
        critic.update(_with_targets(critic, batch))
        states.append(critic.state_dict())
    assert max((states[0][k] - states[1][k]).abs().max().item() for k in states[0]) < 1e-6


def test_fsdp_critic_matches_plain(policy_dir, batch):
    created = not dist.is_initialized()
    try:
        sharded = Critic(load_value_model(policy_dir[0]), TrainConfig(fsdp=True, micro_batch_size=4),
                         CriticConfig(lr=1e-2), AlgorithmConfig(advantage="gae"))
        plain = _critic(load_value_model(policy_dir[0]), micro_batch_size=4)
        m_s, m_p = sharded.update(_with_targets(sharded, batch)), plain.update(_with_targets(plain, batch))
        assert m_s["critic/value_loss"] == pytest.approx(m_p["critic/value_loss"], abs=1e-6)
        s_s, s_p = sharded.state_dict(), plain.state_dict()
        assert set(s_s) == set(s_p)
        assert max((s_s[k] - s_p[k]).abs().max().item() for k in s_s) < 1e-5
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def test_update_needs_values_and_returns(policy_dir, batch):
    with pytest.raises(ValueError, match="batch.values"):
        _critic(load_value_model(policy_dir[0])).update(batch)

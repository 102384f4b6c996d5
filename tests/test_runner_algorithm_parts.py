"""The runner's stages between rollout and update (issue 4): reward shaping, overlong filtering, the group
filter with dynamic sampling, advantages (KL in the reward, whitening, GAE) and batch concatenation."""

from __future__ import annotations

import pytest
import torch

from m2flow.algorithms import (
    gae_advantages,
    grpo_advantages,
    kl_penalty_rewards,
    reinforce_pp_advantages,
    scores_to_token_rewards,
    whiten_advantages,
)
from m2flow.batch import RolloutBatch
from m2flow.config import Config, load_config
from m2flow.rollout.types import Sample
from m2flow.stages import (
    collect_batch,
    compute_advantages,
    informative_rows,
    prepare_round,
    round_seed,
    shape_rewards,
)

PAD = 0


def _samples(prompt_lens, resp_lens, finish=None, group=None):
    finish = finish or ["stop"] * len(resp_lens)
    group = group or list(range(len(resp_lens)))
    return [
        Sample(prompt_index=g, prompt_ids=list(range(5, 5 + p)), token_ids=list(range(40, 40 + t)),
               logprobs=[-0.5 - 0.1 * i for i in range(t)], finish_reason=f)
        for p, t, f, g in zip(prompt_lens, resp_lens, finish, group)
    ]


def _round(scores, groups, cfg, r=0, resp_lens=None, finish=None):
    resp_lens = resp_lens or [3] * len(scores)
    samples = _samples([4] * len(scores), resp_lens, finish, groups)
    batch = RolloutBatch.from_samples(samples, PAD)
    return prepare_round(batch, samples, torch.tensor(scores, dtype=torch.float32), cfg,
                         group_offset=r * cfg.train.prompts_per_step)


# --- reward shaping and the overlong filter --------------------------------------------------------------


def test_shape_rewards_defaults_are_the_identity():
    scores = torch.tensor([1.0, 0.0, -0.5])
    shaped, penalty = shape_rewards(scores, torch.tensor([3.0, 48.0, 10.0]), Config())
    assert shaped is scores and penalty is None


def test_shape_rewards_overlong_then_scale_and_clip():
    cfg = load_config(None, ["rollout.max_new_tokens=10", "reward.overlong_buffer=4", "reward.overlong_penalty=1.0",
                             "reward.scale=2.0", "reward.clip=1.5"])
    # L = 6: lengths 6 -> 0, 8 -> -0.5, 10 -> -1
    shaped, penalty = shape_rewards(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([6.0, 8.0, 10.0]), cfg)
    assert penalty.tolist() == [0.0, -0.5, -1.0]
    assert shaped.tolist() == [1.5, 1.0, 0.0]  # (1 + p) * 2, clipped to 1.5


def test_prepare_round_masks_truncated_and_offsets_groups():
    cfg = load_config(None, ["algorithm.overlong_filter=true", "train.prompts_per_step=2"])
    rnd = _round([1.0, 0.0, 1.0], [0, 0, 1], cfg, r=2, resp_lens=[2, 4, 3], finish=["stop", "length", "stop"])
    assert rnd.batch.group_ids.tolist() == [4, 4, 5]
    assert rnd.lengths.tolist() == [2, 4, 3]  # measured before the filter
    assert rnd.batch.response_mask.sum(1).tolist() == [2, 0, 3]
    assert rnd.batch.scores.tolist() == [1.0, 0.0, 1.0]
    off = _round([1.0, 0.0, 1.0], [0, 0, 1], Config(), resp_lens=[2, 4, 3], finish=["stop", "length", "stop"])
    assert off.batch.response_mask.sum(1).tolist() == [2, 4, 3]


def test_round_seed_keeps_the_old_seed_for_round_zero():
    assert round_seed(3, 7, 0) == 3 * 1_000_003 + 7
    assert len({round_seed(3, step, r) for step in range(1, 50) for r in range(4)}) == 49 * 4


# --- the group filter and dynamic sampling ---------------------------------------------------------------


def _scripted(cfg, per_round):
    """generate_round for collect_batch: round r yields per_round[r] = (scores, groups)."""
    calls = []

    def generate_round(r):
        calls.append(r)
        scores, groups = per_round[r]
        return _round(scores, groups, cfg, r=r)

    return generate_round, calls


def test_collect_without_filter_is_one_round_of_everything():
    cfg = load_config(None, ["algorithm.filter_groups=false", "train.prompts_per_step=2"])
    gen, calls = _scripted(cfg, [([1.0, 1.0, 0.0, 1.0], [0, 0, 1, 1])])
    rounds, train, metrics = collect_batch(gen, cfg, PAD)
    assert calls == [0] and train is rounds[0].batch and metrics == {}


def test_collect_one_round_keeps_informative_groups():
    cfg = load_config(None, ["train.prompts_per_step=3"])
    gen, calls = _scripted(cfg, [([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [0, 0, 1, 1, 2, 2])])
    rounds, train, metrics = collect_batch(gen, cfg, PAD)
    assert calls == [0]
    assert train.group_ids.tolist() == [1, 1]
    assert metrics == {"batch/sampling_rounds": 1.0, "batch/dropped_groups": 2.0, "batch/kept_groups": 1.0}


def test_dynamic_sampling_fills_the_batch_and_cuts_the_surplus():
    cfg = load_config(None, ["train.prompts_per_step=2", "algorithm.dynamic_sampling_max_tries=5"])
    gen, calls = _scripted(cfg, [
        ([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1]),  # nothing informative
        ([1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1]),  # one group (id 2 + 0)
        ([0.0, 1.0, 1.0, 0.0], [0, 0, 1, 1]),  # two more (ids 4, 5): one too many
        ([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1]),  # never reached
    ])
    rounds, train, metrics = collect_batch(gen, cfg, PAD)
    assert calls == [0, 1, 2]
    assert train.group_ids.tolist() == [2, 2, 4, 4]
    assert train.scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert metrics == {"batch/sampling_rounds": 3.0, "batch/dropped_groups": 3.0, "batch/kept_groups": 2.0}


def test_dynamic_sampling_gives_up_after_max_tries():
    cfg = load_config(None, ["train.prompts_per_step=2", "algorithm.dynamic_sampling_max_tries=2"])
    gen, calls = _scripted(cfg, [([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1]), ([1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1])])
    rounds, train, metrics = collect_batch(gen, cfg, PAD)
    assert calls == [0, 1] and len(rounds) == 2
    assert train.group_ids.tolist() == [2, 2]
    assert metrics["batch/kept_groups"] == 1.0 and metrics["batch/dropped_groups"] == 3.0


def test_concat_repads_prompts_left_and_responses_right():
    a = RolloutBatch.from_samples(_samples([2, 3], [1, 2]), PAD)
    b = RolloutBatch.from_samples(_samples([5], [4]), PAD)
    a.scores, b.scores = torch.tensor([1.0, 0.0]), torch.tensor([0.5])
    a.advantages, b.advantages = torch.tensor([1.0, -1.0]), torch.tensor([0.0])
    both = RolloutBatch.concat([a, b], PAD)
    assert both.input_ids.shape == (3, 5 + 4) and both.prompt_width == 5
    assert both.response_mask.sum(1).tolist() == [1, 2, 4]
    assert both.attention_mask.sum(1).tolist() == [3, 5, 9]
    assert both.input_ids[0].tolist() == [PAD, PAD, PAD, 5, 6, 40, PAD, PAD, PAD]
    assert both.rollout_logprobs[1, :2].tolist() == pytest.approx([-0.5, -0.6])
    assert both.scores.tolist() == [1.0, 0.0, 0.5] and both.advantages.tolist() == [1.0, -1.0, 0.0]
    assert both.old_logprobs is None  # absent in every part -> absent
    for i, (src, row) in enumerate([(a, 0), (a, 1), (b, 0)]):
        m = src.response_mask[row].bool()
        assert torch.equal(both.input_ids[i, 5:][: int(m.sum())], src.input_ids[row, src.prompt_width:][m])


def test_concat_leaves_logprobs_unchanged(make_micro_model):
    from m2flow.training.forward import batch_logprobs

    model = make_micro_model(0).eval()
    a = RolloutBatch.from_samples(_samples([2, 6], [5, 2]), PAD)
    b = RolloutBatch.from_samples(_samples([3], [7]), PAD)
    both = RolloutBatch.concat([a, b], PAD)
    alone = [batch_logprobs(model, x, 1.0, 8) for x in (a, b)]
    joint = batch_logprobs(model, both, 1.0, 8)
    torch.testing.assert_close(joint[:2, : alone[0].shape[1]], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(joint[2:], alone[1], atol=1e-5, rtol=0)


# --- advantages ------------------------------------------------------------------------------------------


def _train_batch(cfg, scores, groups, resp_lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = _round(scores, groups, cfg, resp_lens=resp_lens)
    b = rnd.batch
    b.old_logprobs = -torch.rand(b.response_mask.shape, generator=gen) * b.response_mask
    b.ref_logprobs = -torch.rand(b.response_mask.shape, generator=gen) * b.response_mask
    return b


SCORES = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2, 2]
LENS = [3, 1, 4, 2, 2, 5, 1, 3, 2]


def test_default_grpo_advantages_equal_the_previous_pipeline():
    """Before: advantages on the whole batch, then the group filter. Now: filter first. Bit-identical."""
    cfg = Config()
    full = _train_batch(cfg, SCORES, GROUPS, LENS)
    before = grpo_advantages(full.scores, full.group_ids, norm_by_std=True)[informative_rows(full)]
    train = full.select(informative_rows(full))
    metrics = compute_advantages(train, cfg)
    assert torch.equal(train.advantages, before)
    assert set(metrics) == {"advantage/mean", "advantage/abs_mean"}


def test_whitened_advantages():
    cfg = load_config(None, ["algorithm.whiten_advantages=true", "algorithm.advantage=rloo"])
    b = _train_batch(cfg, SCORES, GROUPS, LENS)
    compute_advantages(b, cfg)
    assert b.advantages.shape == b.response_mask.shape
    from m2flow.algorithms import rloo_advantages

    torch.testing.assert_close(b.advantages, whiten_advantages(rloo_advantages(b.scores, b.group_ids), b.response_mask))


@pytest.mark.parametrize("advantage", ["reinforce_pp", "reinforce_pp_baseline"])
def test_kl_in_reward(advantage):
    cfg = load_config(None, [f"algorithm.advantage={advantage}", "algorithm.kl_coef=0.1",
                             "algorithm.kl_in_reward=true", "algorithm.kl_estimator=k1", "algorithm.gamma=0.9"])
    b = _train_batch(cfg, SCORES, GROUPS, LENS)
    metrics = compute_advantages(b, cfg)
    rewards = kl_penalty_rewards(b.scores, b.old_logprobs, b.ref_logprobs, b.response_mask, 0.1, "k1")
    from m2flow.algorithms import ADVANTAGE_ESTIMATORS

    want = ADVANTAGE_ESTIMATORS.get(advantage)(b.scores, b.group_ids, response_mask=b.response_mask,
                                               token_rewards=rewards, gamma=0.9)
    torch.testing.assert_close(b.advantages, want)
    m = b.response_mask.bool()
    assert metrics["reward/kl"] == pytest.approx(float((b.old_logprobs - b.ref_logprobs)[m].mean()), abs=1e-6)
    # and the KL changes the advantages compared with no penalty
    plain = reinforce_pp_advantages(b.scores, b.group_ids, response_mask=b.response_mask, gamma=0.9)
    if advantage == "reinforce_pp":
        assert not torch.allclose(b.advantages, plain)


def test_gae_advantages_and_returns_from_values():
    cfg = load_config(None, ["algorithm.advantage=gae", "algorithm.gamma=0.9", "algorithm.lam=0.8"])
    b = _train_batch(cfg, SCORES, GROUPS, LENS)
    b.values = torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(1)) * b.response_mask
    compute_advantages(b, cfg)
    adv, ret = gae_advantages(scores_to_token_rewards(b.scores, b.response_mask), b.values, b.response_mask, 0.9, 0.8)
    torch.testing.assert_close(b.advantages, adv)
    torch.testing.assert_close(b.returns, ret)


def test_actor_passes_dual_clip_and_tis_and_skips_kl_loss_in_reward(monkeypatch, make_micro_model):
    from m2flow.config import AlgorithmConfig, TrainConfig
    from m2flow.training.actor import Actor

    seen = {}

    def spy(logprobs, old_logprobs, advantages, mask, **options):
        seen.update(options)
        return (logprobs * mask).sum() * 0, {}

    algo = AlgorithmConfig(clip_ratio_c=3.0, tis_cap=2.0, kl_coef=0.1, kl_in_reward=True, advantage="reinforce_pp")
    actor = Actor(make_micro_model(0), TrainConfig(fsdp=False), algo)
    assert actor.kl is None  # the KL lives in the rewards
    actor.policy_loss = spy
    b = _train_batch(Config(), SCORES, GROUPS, LENS)
    b.input_ids = b.input_ids.clamp(max=100)
    b.advantages = torch.zeros(len(b))
    metrics = actor.update(b)
    assert seen["clip_ratio_c"] == 3.0 and seen["tis_cap"] == 2.0
    assert seen["rollout_logprobs"].shape == b.response_mask.shape
    assert "actor/kl" not in metrics
    plain = Actor(make_micro_model(0), TrainConfig(fsdp=False), AlgorithmConfig())
    assert plain.loss_options == {}  # defaults: the loss is called exactly as before


def test_actor_tis_metrics_reach_the_update_metrics(make_micro_model):
    from m2flow.config import AlgorithmConfig, TrainConfig
    from m2flow.training.actor import Actor

    actor = Actor(make_micro_model(0), TrainConfig(fsdp=False), AlgorithmConfig(tis_cap=1.5, clip_ratio_c=3.0))
    b = _train_batch(Config(), SCORES, GROUPS, LENS)
    b.advantages = grpo_advantages(b.scores, b.group_ids)
    b.old_logprobs = actor.compute_logprobs(b)
    metrics = actor.update(b)
    for key in ("actor/pg_tis_weight_mean", "actor/pg_tis_capped_frac", "actor/pg_dual_clip_frac"):
        assert key in metrics, key
    assert 0 < metrics["actor/pg_tis_weight_mean"] <= 1.5


def test_gae_with_kl_in_reward():
    cfg = load_config(None, ["algorithm.advantage=gae", "algorithm.kl_coef=0.2", "algorithm.kl_in_reward=true",
                             "algorithm.kl_estimator=k3", "algorithm.lam=0.9"])
    b = _train_batch(cfg, SCORES, GROUPS, LENS)
    b.values = torch.zeros(b.response_mask.shape)
    metrics = compute_advantages(b, cfg)
    rewards = kl_penalty_rewards(b.scores, b.old_logprobs, b.ref_logprobs, b.response_mask, 0.2, "k3")
    adv, ret = gae_advantages(rewards, b.values, b.response_mask, 1.0, 0.9)
    torch.testing.assert_close(b.advantages, adv)
    torch.testing.assert_close(b.returns, ret)
    assert metrics["reward/kl"] > 0  # k3 is never negative

"""dr_grpo, rloo, seq-mean-token-sum-norm and PPO dual-clip, against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from m2flow.algorithms import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    ppo_clip_loss,
)


def test_registry_names_include_new_entries():
    assert {"grpo", "dr_grpo", "rloo"} <= set(ADVANTAGE_ESTIMATORS.names())
    assert "seq-mean-token-sum-norm" in LOSS_AGGREGATIONS.names()


def test_dr_grpo_two_groups_no_std_norm():
    # group 7: [1, 0, 0, 1] mean 0.5 -> [0.5, -0.5, -0.5, 0.5]; group 3: [2, 4, 9] mean 5 -> [-3, -1, 4]
    scores = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0, 9.0, 1.0])
    gids = torch.tensor([7, 3, 7, 3, 7, 3, 7])
    adv = ADVANTAGE_ESTIMATORS.get("dr_grpo")(scores, gids, response_mask=torch.ones(7, 2))
    assert torch.allclose(adv, torch.tensor([0.5, -3.0, -0.5, -1.0, -0.5, 4.0, 0.5]))


def test_rloo_group_of_four_and_singleton():
    # group 0: [1, 0, 0, 3]; A_0 = 1 - (0+0+3)/3 = 0, A_1 = 0 - 4/3, A_2 = -4/3, A_3 = 3 - 1/3 = 8/3
    # group 5 is a singleton -> 0
    scores = torch.tensor([1.0, 0.0, 0.0, 3.0, 7.0])
    gids = torch.tensor([0, 0, 0, 0, 5])
    adv = ADVANTAGE_ESTIMATORS.get("rloo")(scores, gids)
    assert torch.allclose(adv, torch.tensor([0.0, -4.0 / 3, -4.0 / 3, 8.0 / 3, 0.0]))
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()


def test_seq_mean_token_sum_norm_masked_2x3_with_empty_row():
    loss_mat = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 5.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    # valid sum = 1 + 2 + 3 + 5 = 11; 2 non-empty rows, T = 3 -> 11 / 6
    out = aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm")
    assert out.item() == pytest.approx(11.0 / 6.0)
    # all-masked batch gives 0, not NaN
    assert aggregate_loss(loss_mat, torch.zeros_like(mask), "seq-mean-token-sum-norm").item() == 0.0


def test_dual_clip_caps_negative_advantage_token():
    # token 0: A = -1, ratio = e^3 ~ 20.09 -> standard loss 20.09, dual-clip cap -A*c = 3
    # token 1: A = +2, ratio = e^3 -> standard clipped loss -2 * 1.2 = -2.4, unaffected
    old = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), 3.0, requires_grad=True)
    adv = torch.tensor([[-1.0, 2.0]])
    mask = torch.ones(1, 2)
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_ratio_c=3.0, loss_agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx(3.0 - 2.4)
    assert metrics["dual_clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # capped token: constant loss -> zero grad; positive token is clipped too (ratio > 1.2) -> zero grad
    assert logprobs.grad.tolist() == [[0.0, 0.0]]

    base, base_metrics = ppo_clip_loss(logprobs.detach(), old, adv, mask, loss_agg="seq-mean-token-sum")
    assert base.item() == pytest.approx(torch.exp(torch.tensor(3.0)).item() - 2.4)
    assert "dual_clip_frac" not in base_metrics


def test_dual_clip_leaves_positive_advantage_gradient():
    # A = +1, ratio = 1 (inside the clip range): loss -1, grad d(-A r)/dlogp = -1 both with and without c
    logprobs = torch.zeros(1, 1, requires_grad=True)
    ones = torch.ones(1, 1)
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(1, 1), ones, ones, clip_ratio_c=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert logprobs.grad.item() == pytest.approx(-1.0)
    assert metrics["dual_clip_frac"] == 0.0


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_dual_clip_ratio_must_exceed_one(c):
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_clip_loss(x, x, x, torch.ones(1, 1), clip_ratio_c=c)


def test_group_estimators_accept_the_runner_options():
    """The runner passes norm_by_std to whichever estimator is configured."""
    import torch

    from m2flow.algorithms import ADVANTAGE_ESTIMATORS

    scores, groups = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0])
    assert ADVANTAGE_ESTIMATORS.get("dr_grpo")(scores, groups, norm_by_std=True).tolist() == [0.75, -0.25, -0.25, -0.25]
    rloo = ADVANTAGE_ESTIMATORS.get("rloo")(scores, groups, norm_by_std=True)
    assert torch.allclose(rloo, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_every_estimator_accepts_the_full_runner_options():
    """The runner passes one set of options (norm_by_std, gamma, response_mask, token_rewards) to any estimator."""
    import torch

    from m2flow.algorithms import ADVANTAGE_ESTIMATORS

    scores, groups = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    for name in ADVANTAGE_ESTIMATORS.names():
        adv = ADVANTAGE_ESTIMATORS.get(name)(scores, groups, response_mask=mask, norm_by_std=True, gamma=1.0,
                                             token_rewards=None)
        assert torch.isfinite(adv).all(), name

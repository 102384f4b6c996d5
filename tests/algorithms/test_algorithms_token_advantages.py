"""Token-level advantages: whitening, outcome score placement, returns-to-go, REINFORCE++ (+baseline), GAE."""

from __future__ import annotations

import math

import pytest
import torch

from m2flow.algorithms import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    gae_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    scores_to_token_rewards,
    whiten,
    whiten_advantages,
)

NAN, INF = float("nan"), float("inf")
R2 = math.sqrt(2)


def test_whiten_population_std_ignores_masked_junk():
    # valid entries [1, 3, 3, 5]: mean 3, deviations [-2, 0, 0, 2], population var 8 / 4 = 2, std sqrt(2)
    x = torch.tensor([[1.0, 3.0, 3.0, INF], [5.0, NAN, -7.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = whiten(x, m, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[-R2, 0.0, 0.0, 0.0], [R2, 0.0, 0.0, 0.0]]))
    # scale only: x / sqrt(2), not re-centred
    out = whiten(x, m, shift_mean=False, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[1 / R2, 3 / R2, 3 / R2, 0.0], [5 / R2, 0.0, 0.0, 0.0]]))


def test_whiten_constant_input_is_exact_zero_or_unchanged():
    x = torch.tensor([[0.3, 0.3, 9.0], [0.3, -1.0, -1.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])  # valid: three 0.3s
    assert whiten(x, m).tolist() == [[0.0] * 3] * 2
    torch.testing.assert_close(whiten(x, m, shift_mean=False), torch.tensor([[0.3, 0.3, 0.0], [0.3, 0.0, 0.0]]))
    # a single valid token, and no valid token at all
    assert whiten(x, torch.tensor([[1, 0, 0], [0, 0, 0]])).tolist() == [[0.0] * 3] * 2
    assert whiten(x, torch.zeros(2, 3)).tolist() == [[0.0] * 3] * 2


def test_whiten_advantages_broadcasts_sequence_advantages():
    # [2, 0] broadcast over lengths 1 and 3 -> valid tokens [2, 0, 0, 0]: mean 0.5, var (2.25 + 3 * 0.25) / 4
    # = 0.75, std sqrt(0.75) -> 1.5 / 0.8660254 = 1.7320508 and -0.5 / 0.8660254 = -0.5773503
    m = torch.tensor([[1, 0, 0], [1, 1, 1]])
    out = whiten_advantages(torch.tensor([2.0, 0.0]), m, eps=0.0)
    s = math.sqrt(0.75)
    torch.testing.assert_close(out, torch.tensor([[1.5 / s, 0.0, 0.0], [-0.5 / s] * 3]))


def test_scores_to_token_rewards_last_valid_token():
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 1], [0, 0, 0]])  # row 2 has a hole, row 3 is empty
    out = scores_to_token_rewards(torch.tensor([2.0, -1.0, 5.0, 7.0]), m)
    assert out.tolist() == [[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]]
    assert out.dtype == torch.float32
    assert scores_to_token_rewards(torch.tensor([1, 0]), m[:2]).dtype == torch.float32  # int scores


def test_discounted_returns_skips_masked_positions():
    # row 0: rewards [1, 0, 2], gamma 0.5 -> G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5
    # row 1: [1, junk, 2] with the middle masked -> G2 = 2, G0 = 1 + 0.5 * 2 = 2 (the hole is no step)
    r = torch.tensor([[1.0, 0.0, 2.0], [1.0, NAN, 2.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 1]])
    out = discounted_returns(r, m, gamma=0.5)
    assert out.tolist() == [[1.5, 1.0, 2.0], [2.0, 0.0, 2.0]]


MASK3 = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])  # lengths 3, 1, 2


def test_reinforce_pp_gamma_one_whitens_the_scores_over_tokens():
    # scores [1, 0, 1] -> token returns [1, 1, 1 | 0 | 1, 1]: 6 tokens, mean 5/6, var 5/6 - 25/36 = 5/36,
    # std sqrt(5)/6 -> a 1 gives (1/6) / (sqrt(5)/6) = 1/sqrt(5), the 0 gives (-5/6) / (sqrt(5)/6) = -sqrt(5)
    adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), response_mask=MASK3)
    a, b = 1 / math.sqrt(5), -math.sqrt(5)
    torch.testing.assert_close(adv, torch.tensor([[a, a, a], [b, 0.0, 0.0], [a, a, 0.0]]))


def test_reinforce_pp_discounted():
    # gamma 0.5: returns [0.25, 0.5, 1 | 0 | 0.5, 1]; sum 3.25 -> mean 13/24; sum of squares 2.5625 ->
    # var 2.5625/6 - (13/24)^2 = 77/576, std sqrt(77)/24 -> adv(x) = (24 x - 13) / sqrt(77)
    adv = ADVANTAGE_ESTIMATORS.get("reinforce_pp")(
        torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), response_mask=MASK3, gamma=0.5, norm_by_std=True
    )
    f = lambda x: (24 * x - 13) / math.sqrt(77)  # noqa: E731
    torch.testing.assert_close(adv, torch.tensor([[f(0.25), f(0.5), f(1.0)], [f(0.0), 0, 0], [f(0.5), f(1.0), 0]]))


def test_reinforce_pp_all_equal_scores_exact_zero_and_needs_mask():
    adv = reinforce_pp_advantages(torch.tensor([0.7, 0.7, 0.7]), torch.tensor([0, 1, 2]), response_mask=MASK3)
    assert adv.tolist() == [[0.0] * 3] * 3
    with pytest.raises(ValueError, match="response_mask"):
        reinforce_pp_advantages(torch.tensor([1.0]), torch.tensor([0]))


def test_reinforce_pp_uses_given_token_rewards():
    # token rewards [[0, 1 - 0.5], [-0.5, junk]] with mask [[1, 1], [1, 0]], gamma 1: returns [0.5, 0.5, -0.5]
    # mean 1/6, var (0.25 + 0.25 + 0.25) / 3 - 1/36 = 8/36, std sqrt(8)/6 -> 0.5: (1/3) * 6 / sqrt(8) = 1/sqrt(2)
    # -0.5: (-2/3) * 6 / sqrt(8) = -sqrt(2); the scores argument is ignored
    tr = torch.tensor([[0.0, 0.5], [-0.5, 99.0]])
    adv = reinforce_pp_advantages(torch.tensor([5.0, 5.0]), torch.tensor([0, 0]),
                                  response_mask=torch.tensor([[1, 1], [1, 0]]), token_rewards=tr)
    torch.testing.assert_close(adv, torch.tensor([[1 / R2, 1 / R2], [-R2, 0.0]]))


MASK4 = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])  # lengths 2, 1, 3, 1


def test_reinforce_pp_baseline_flat_group_stays_zero():
    # group 0: [1, 0] - mean 0.5 -> [0.5, -0.5]; group 1: [1, 1] flat -> 0. Tokens: [0.5, 0.5 | -0.5 | 0 0 0 | 0]
    # 7 tokens, mean 0.5/7 = 1/14, E[x^2] = 0.75/7 = 3/28, var = 3/28 - 1/196 = 5/49, std sqrt(5)/7
    # not re-centred: 0.5 * 7 / sqrt(5) = 3.5 / sqrt(5); flat groups exactly 0
    scores, gids = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    adv = reinforce_pp_baseline_advantages(scores, gids, response_mask=MASK4)
    a = 3.5 / math.sqrt(5)
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0.0], [-a, 0.0, 0.0], [0.0] * 3, [0.0] * 3]))
    assert (adv[2:] == 0).all()
    # re-centred (verl / OpenRLHF): (0.5 - 1/14) * 7/sqrt(5) = 3/sqrt(5), (-0.5 - 1/14) * 7/sqrt(5) = -4/sqrt(5),
    # flat group tokens (0 - 1/14) * 7/sqrt(5) = -0.5/sqrt(5)
    adv = reinforce_pp_baseline_advantages(scores, gids, response_mask=MASK4, shift_mean=True)
    a, b, c = 3 / math.sqrt(5), -4 / math.sqrt(5), -0.5 / math.sqrt(5)
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0.0], [b, 0.0, 0.0], [c, c, c], [c, 0.0, 0.0]]))


def test_reinforce_pp_baseline_all_groups_flat_and_token_rewards():
    adv = ADVANTAGE_ESTIMATORS.get("reinforce_pp_baseline")(
        torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]), response_mask=MASK4, norm_by_std=True)
    assert adv.tolist() == [[0.0] * 3] * 4
    # token rewards summed per sequence: [0.5 + 0.5, 0 (junk masked), 2 - 1 + 0, 1] -> group 0 [1, 0], group 1
    # [1, 1] flat: same as the first case above
    tr = torch.tensor([[0.5, 0.5, 9.0], [0.0, 9.0, 9.0], [2.0, -1.0, 0.0], [1.0, 9.0, 9.0]])
    adv = reinforce_pp_baseline_advantages(torch.zeros(4), torch.tensor([0, 0, 1, 1]), response_mask=MASK4,
                                           token_rewards=tr)
    a = 3.5 / math.sqrt(5)
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0.0], [-a, 0.0, 0.0], [0.0] * 3, [0.0] * 3]))


def test_gae_hand_values_unequal_lengths():
    # row 0 (3 tokens), gamma 0.9, lam 0.5, V = [0.5, 0.6, 0.8], r = [0, 0, 1]:
    #   t2: delta = 1 + 0.9 * 0 - 0.8 = 0.2, A = 0.2
    #   t1: delta = 0 + 0.9 * 0.8 - 0.6 = 0.12, A = 0.12 + 0.45 * 0.2 = 0.21
    #   t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04, A = 0.04 + 0.45 * 0.21 = 0.1345
    # row 1 (2 tokens; V and r at the masked t2 are junk): r = [0, 2], V = [1.0, 0.5]
    #   t1: delta = 2 + 0 - 0.5 = 1.5, A = 1.5; t0: delta = 0 + 0.9 * 0.5 - 1.0 = -0.55, A = -0.55 + 0.45 * 1.5 = 0.125
    # returns = A + V
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    v = torch.tensor([[0.5, 0.6, 0.8], [1.0, 0.5, NAN]], requires_grad=True)
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.1345, 0.21, 0.2], [0.125, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.6345, 0.81, 1.0], [1.125, 2.0, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_gamma_lam_one_is_return_minus_value():
    # G = score on every valid token: row 0 G = 1 -> A = 1 - V = [0.5, 0.4, 0.2]; row 1 G = 2 -> [1.0, 1.5]
    r = scores_to_token_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    v = torch.tensor([[0.5, 0.6, 0.8], [1.0, 0.5, 7.0]])
    adv, ret = gae_advantages(r, v, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.2], [1.0, 1.5, 0.0]]))
    assert ret.tolist() == [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]


def test_gae_skips_a_hole():
    # mask [1, 0, 1], gamma 1, lam 1: the hole's V (5) is never used; t2: A = 1 - 0.5 = 0.5;
    # t0: delta = 0 + 0.5 - 0.2 = 0.3, A = 0.3 + 0.5 = 0.8 (= G - V = 1 - 0.2)
    adv, ret = gae_advantages(torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor([[0.2, 5.0, 0.5]]),
                              torch.tensor([[1, 0, 1]]))
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.0, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 0.0, 1.0]]))

"""KL as a per-token reward penalty."""

from __future__ import annotations

import math

import pytest
import torch

from m2flow.algorithms import kl_penalty_rewards, reinforce_pp_advantages

MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
# logprobs - ref = [[0.5, -0.2, junk], [0.1, junk, junk]]
LOGP = torch.tensor([[0.0, -1.2, 3.0], [-0.4, 0.0, 0.0]])
REF = torch.tensor([[-0.5, -1.0, -50.0], [-0.5, 50.0, float("nan")]])


def test_k1_penalty_on_scores_placed_on_last_token():
    # scores [1, 0] -> token rewards [[0, 1, 0], [0, 0, 0]]; minus 0.1 * k1:
    # [[0 - 0.05, 1 + 0.02, 0], [0 - 0.01, 0, 0]] (masked tokens 0 whatever their logprobs)
    out = kl_penalty_rewards(torch.tensor([1.0, 0.0]), LOGP, REF, MASK, kl_coef=0.1)
    torch.testing.assert_close(out, torch.tensor([[-0.05, 1.02, 0.0], [-0.01, 0.0, 0.0]]))


def test_k3_penalty_on_token_rewards_and_no_gradient():
    # k3 with log r = ref - logp: token (0,0) log r = -0.5 -> e^-0.5 + 0.5 - 1 = 0.1065307;
    # (0,1) log r = 0.2 -> e^0.2 - 0.2 - 1 = 0.0214028; (1,0) log r = -0.1 -> e^-0.1 + 0.1 - 1 = 0.0048374
    logp = LOGP.clone().requires_grad_()
    tr = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    out = kl_penalty_rewards(tr, logp, REF, MASK, kl_coef=1.0, estimator="k3")
    expected = [[-(math.exp(-0.5) - 0.5), 2.0 - (math.exp(0.2) - 1.2), 0.0], [1.0 - (math.exp(-0.1) - 0.9), 0.0, 0.0]]
    torch.testing.assert_close(out, torch.tensor(expected))
    assert not out.requires_grad


def test_kl_rewards_feed_reinforce_pp():
    # kl_coef 0 gives back the outcome rewards, so reinforce_pp(token_rewards=...) equals the plain estimator
    rewards = kl_penalty_rewards(torch.tensor([1.0, 0.0]), LOGP, REF, MASK, kl_coef=0.0)
    a = reinforce_pp_advantages(torch.zeros(2), torch.zeros(2), response_mask=MASK, token_rewards=rewards)
    b = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), torch.zeros(2), response_mask=MASK)
    torch.testing.assert_close(a, b)
    assert a.abs().sum() > 0
    with pytest.raises(ValueError, match="valid names"):
        kl_penalty_rewards(rewards, LOGP, REF, MASK, kl_coef=0.1, estimator="k9")

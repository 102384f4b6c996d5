"""GSPO's sequence-ratio loss and truncated importance sampling (TIS), against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from m2flow.algorithms import POLICY_LOSSES, gspo_loss, ppo_clip_loss

E05 = math.exp(0.05)
# row 0: 2 valid tokens with log-ratios [0.2, -0.1] -> sequence log-ratio 0.05, s = e^0.05 = 1.0512711
# row 1: 1 valid token with log-ratio 0 -> s = 1; its masked tokens hold junk
LOGP = [[0.2, -0.1, 7.0], [0.0, 5.0, -3.0]]
OLD = torch.zeros(2, 3)
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def _gspo(logp=LOGP, adv=ADV, mask=MASK, **kw):
    logp = torch.tensor(logp, requires_grad=True)
    loss, metrics = gspo_loss(logp, OLD[: logp.shape[0], : logp.shape[1]], adv, mask, **kw)
    loss.backward()
    return loss.item(), logp.grad, metrics


def test_gspo_default_tiny_clip():
    # row 0: s = 1.0513 > 1 + 4e-4 with A = +1 -> clipped to -1.0004 per token, no grad
    # row 1: s = 1 inside [1 - 3e-4, 1 + 4e-4]: loss -(-2) * 1 = 2, grad d(2 s)/dlogp = 2 s = 2
    # seq-mean-token-mean: (-1.0004 + 2) / 2 = 0.4998; row 1's gradient is halved by the sequence mean -> 1.0
    loss, grad, m = _gspo()
    assert loss == pytest.approx(0.4998)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert m["clip_frac"] == pytest.approx(2 / 3)  # row 0's two tokens of 3 valid
    assert m["ratio_mean"] == pytest.approx((E05 + 1) / 2)
    # k3 on token ratios: (e^0.2 - 1 - 0.2) + (e^-0.1 - 1 + 0.1) + 0, over 3 tokens
    assert m["approx_kl"] == pytest.approx((math.exp(0.2) - 1.2 + math.exp(-0.1) - 0.9) / 3, rel=1e-5)  # float32


def test_gspo_every_token_carries_the_sequence_ratio_gradient():
    # wide clip: nothing clipped. Row 0 loss per token -e^0.05; seq means (-e^0.05 + 2) / 2.
    # each row-0 token's grad is -A * s / (2 tokens) / (2 seqs) = -e^0.05 / 4, the same for both tokens even
    # though their own ratios (e^0.2, e^-0.1) differ
    loss, grad, m = _gspo(clip_ratio_low=0.2, clip_ratio_high=0.2)
    assert loss == pytest.approx((-E05 + 2) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-E05 / 4, -E05 / 4, 0.0], [1.0, 0.0, 0.0]]))
    assert m["clip_frac"] == 0.0


def test_gspo_gradient_equals_sequence_level_objective():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 5, generator=g) * 0.3).requires_grad_()
    old = torch.randn(4, 5, generator=g) * 0.3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv_seq = torch.tensor([1.0, -0.5, 2.0, -1.0])
    loss, _ = gspo_loss(logp, old, adv_seq[:, None].expand(4, 5), mask, clip_ratio_low=10.0, clip_ratio_high=10.0)
    (g1,) = torch.autograd.grad(loss, logp)
    # sequence-level: mean_i -A_i * exp(mean_t (logp - old)) over valid tokens
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    (g2,) = torch.autograd.grad((-adv_seq * s).mean(), logp)
    torch.testing.assert_close(loss, (-adv_seq * s).mean())
    torch.testing.assert_close(g1, g2)


def test_gspo_negative_advantage_below_clip():
    # s = e^-0.01 = 0.99005 < 1 - 3e-4 with A = -1: max(0.99005, 0.9997) = 0.9997 (clipped, no grad)
    loss, grad, m = _gspo([[-0.01]], torch.tensor([[-1.0]]), torch.tensor([[1]]))
    assert loss == pytest.approx(0.9997)
    assert grad.item() == 0.0 and m["clip_frac"] == 1.0


def test_gspo_registered_and_rejects_dual_clip():
    assert POLICY_LOSSES.get("gspo") is gspo_loss
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        gspo_loss(x, x, x, torch.ones(1, 1), clip_ratio_c=3.0)


# TIS: old = 0, rollout = [0.5, -1.0, junk]: weights exp(old - rollout) = [e^-0.5, e^1] = [0.6065307, 2.7182818],
# capped at 2 -> [0.6065307, 2.0]; the third token is masked (its raw weight would be huge)
ROLLOUT = torch.tensor([[0.5, -1.0, -100.0]])
W0 = math.exp(-0.5)


@pytest.mark.parametrize("fn", [ppo_clip_loss, gspo_loss])
def test_tis_weights_scale_each_token_loss(fn):
    # ratio 1 everywhere, A = 1: per-token loss -w. ppo token-mean and gspo seq-mean-token-mean agree for one
    # sequence: -(0.6065307 + 2) / 2 = -1.3032653; grad -w / 2
    logp = torch.zeros(1, 3, requires_grad=True)
    rollout = ROLLOUT.clone().requires_grad_()
    mask = torch.tensor([[1, 1, 0]])
    loss, m = fn(logp, torch.zeros(1, 3), torch.ones(1, 3), mask, rollout_logprobs=rollout, tis_cap=2.0,
                 clip_ratio_low=0.2, clip_ratio_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(W0 + 2) / 2)
    torch.testing.assert_close(logp.grad, torch.tensor([[-W0 / 2, -1.0, 0.0]]))
    assert rollout.grad is None  # weights are detached
    assert m["tis_weight_mean"] == pytest.approx((W0 + 2) / 2)
    assert m["tis_capped_frac"] == pytest.approx(0.5)


def test_tis_off_by_default_and_validated():
    logp, mask = torch.zeros(1, 3), torch.tensor([[1, 1, 0]])
    base, m = ppo_clip_loss(logp, logp, torch.ones(1, 3), mask)
    # rollout logprobs without a cap change nothing
    same, m2 = ppo_clip_loss(logp, logp, torch.ones(1, 3), mask, rollout_logprobs=ROLLOUT)
    assert same.item() == base.item() == -1.0 and m2 == m and "tis_weight_mean" not in m
    with pytest.raises(ValueError, match="rollout_logprobs"):
        ppo_clip_loss(logp, logp, torch.ones(1, 3), mask, tis_cap=2.0)
    with pytest.raises(ValueError, match="tis_cap"):
        gspo_loss(logp, logp, torch.ones(1, 3), mask, rollout_logprobs=ROLLOUT, tis_cap=0.0)

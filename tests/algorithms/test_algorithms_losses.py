import math

import pytest
import torch

from m2flow.algorithms import POLICY_LOSSES, entropy_from_logits, logprobs_from_logits, ppo_clip_loss


def _loss(logp, old, adv, mask, **kw):
    logp = torch.tensor(logp, requires_grad=True)
    loss, metrics = ppo_clip_loss(logp, torch.tensor(old), torch.tensor(adv), torch.tensor(mask), **kw)
    loss.backward()
    return loss.item(), logp.grad, metrics


def test_ratio_one_is_minus_mean_advantage():
    old = [[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]]
    adv = [[1.0, -2.0, 3.0], [0.5, 4.0, 7.0]]
    mask = [[1, 1, 1], [1, 0, 0]]
    loss, grad, m = _loss(old, old, adv, mask)
    assert loss == pytest.approx(-0.625)  # -(1 - 2 + 3 + 0.5) / 4
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.5, -0.75], [-0.125, 0.0, 0.0]]))
    assert m == {"clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0}


def test_positive_advantage_above_clip_has_no_grad():
    # token 0: ratio 1.5 > 1.2 with A=1 -> clipped, loss -1.2, no grad; token 1: ratio 1, A=1 -> grad -1/2
    loss, grad, m = _loss([[math.log(1.5), 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], [[1, 1]])
    assert loss == pytest.approx((-1.2 - 1.0) / 2)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5]]))
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx(1.25)
    assert m["approx_kl"] == pytest.approx((0.5 - math.log(1.5)) / 2)  # k3: r - 1 - log r = 0.0945349 / 2


def test_negative_advantage_below_clip_has_no_grad():
    # ratio 0.5 < 0.8 with A=-1 -> loss max(0.5, 0.8) = 0.8, no grad
    loss, grad, m = _loss([[math.log(0.5)]], [[0.0]], [[-1.0]], [[1]])
    assert loss == pytest.approx(0.8)
    assert grad.item() == 0.0
    assert m["clip_frac"] == 1.0


def test_unclipped_sides_keep_grad():
    # A=-1, ratio 1.5: unclipped 1.5 > 1.2 wins (pessimistic bound), grad = -A * r = 1.5
    # A=+1, ratio 0.5: unclipped -0.5 > -0.8 wins, grad = -A * r = -0.5
    loss, grad, m = _loss([[math.log(1.5), math.log(0.5)]], [[0.0, 0.0]], [[-1.0, 1.0]], [[1, 1]])
    assert loss == pytest.approx((1.5 - 0.5) / 2)
    torch.testing.assert_close(grad, torch.tensor([[0.75, -0.25]]))
    assert m["clip_frac"] == 0.0


def test_asymmetric_clip_high():
    # ratio 1.25 is clipped at 1 + 0.2 but not at 1 + 0.28
    _, grad, m = _loss([[math.log(1.25)]], [[0.0]], [[1.0]], [[1]], clip_ratio_high=0.28)
    assert grad.item() == pytest.approx(-1.25) and m["clip_frac"] == 0.0
    _, grad, m = _loss([[math.log(1.25)]], [[0.0]], [[1.0]], [[1]])
    assert grad.item() == 0.0 and m["clip_frac"] == 1.0


def test_masked_tokens_get_zero_grad_and_are_ignored():
    logp = [[0.0, 5.0], [0.0, -30.0]]
    loss, grad, m = _loss(logp, [[0.0, 0.0], [0.0, 0.0]], [[2.0, 100.0], [4.0, -100.0]], [[1, 0], [1, 0]])
    assert loss == pytest.approx(-3.0)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0], [-2.0, 0.0]]))
    assert m == {"clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0}


def test_loss_agg_option_and_registry():
    fn = POLICY_LOSSES.get("ppo_clip")
    zeros = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = fn(zeros, zeros, adv, mask, loss_agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-(2.0 + 6.0) / 2)
    with pytest.raises(ValueError, match="valid names: gspo, ppo_clip"):
        POLICY_LOSSES.get("ppo")


def test_entropy_from_logits():
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)))
    # p = [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3)
    h = entropy_from_logits(torch.tensor([[[0.0, math.log(3)]]]))
    assert h.item() == pytest.approx(0.5623351)
    # near one-hot with huge logits: ~0 and finite
    h = entropy_from_logits(torch.tensor([[[1000.0, 0.0, -1000.0]]]))
    assert torch.isfinite(h).all() and abs(h.item()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_matches_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 3).to(dtype).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    out = logprobs_from_logits(logits, tokens, chunk_rows=4)  # 15 rows -> 4 chunks
    ref = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    (g1,) = torch.autograd.grad(out.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_logprobs_hand_value():
    # logits [0, ln 3] -> log p = [ln 1/4, ln 3/4]
    out = logprobs_from_logits(torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]]), torch.tensor([[0, 1]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.25), math.log(0.75)]]))

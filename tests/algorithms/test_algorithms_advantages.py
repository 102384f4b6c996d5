import pytest
import torch

from m2flow.algorithms import ADVANTAGE_ESTIMATORS, broadcast_to_tokens, grpo_advantages

# group 0: [1, 0, 1, 0] -> mean 0.5, population std 0.5
# group 1: [1, 2, 3, 6] -> mean 3, deviations [-2, -1, 0, 3], population var 14/4 = 3.5, std 1.8708287
# (the unbiased std would be sqrt(14/3) = 2.1602469, giving -0.9258201 for the first element instead)
SCORES = [1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 6.0]
EXPECTED = [0.999998, -0.999998, 0.999998, -0.999998, -1.0690450, -0.5345225, 0.0, 1.6035675]


def test_grpo_two_groups_of_four():
    adv = grpo_advantages(torch.tensor(SCORES), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert adv.shape == (8,)
    torch.testing.assert_close(adv, torch.tensor(EXPECTED), atol=1e-5, rtol=0)


def test_grpo_interleaved_group_ids():
    # same samples, order shuffled and groups interleaved with arbitrary id values
    order = [4, 0, 5, 1, 6, 2, 7, 3]
    ids = torch.tensor([70, 3, 70, 3, 70, 3, 70, 3])
    adv = grpo_advantages(torch.tensor([SCORES[i] for i in order]), ids)
    torch.testing.assert_close(adv, torch.tensor([EXPECTED[i] for i in order]), atol=1e-5, rtol=0)


def test_grpo_all_equal_group_and_singleton_give_exact_zero():
    scores = torch.tensor([0.1, 0.1, 0.1, 0.7, 1.0, 0.0])
    ids = torch.tensor([0, 0, 0, 1, 2, 2])
    for norm in (True, False):
        adv = grpo_advantages(scores, ids, norm_by_std=norm)
        assert torch.isfinite(adv).all()
        assert (adv[:4] == 0).all()  # exactly zero, not rounding noise
    torch.testing.assert_close(grpo_advantages(scores, ids)[4:], torch.tensor([0.999998, -0.999998]))


def test_grpo_no_std_normalisation():
    adv = grpo_advantages(torch.tensor(SCORES), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.5, -0.5, -2.0, -1.0, 0.0, 3.0]))


def test_grpo_eps():
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([5, 5]), eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))  # 0.5 / (0.5 + 0.5)


def test_grpo_registered_with_convention():
    fn = ADVANTAGE_ESTIMATORS.get("grpo")
    assert fn is grpo_advantages
    mask = torch.ones(2, 3)
    adv = fn(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), response_mask=mask, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    # token-level advantages pass through, masked
    out = broadcast_to_tokens(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), mask)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]))


def test_grpo_float64_kept():
    adv = grpo_advantages(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([0, 0]), eps=0.0)
    assert adv.dtype == torch.float64
    assert adv.tolist() == pytest.approx([-1.0, 1.0])

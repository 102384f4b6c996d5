import math

import pytest
import torch

from m2flow.algorithms import KL_ESTIMATORS

LOGP = torch.tensor([[0.0, -1.0, -2.0]])
REF = torch.tensor([[0.0, -2.0, -1.0]])  # logp - ref = [0, 1, -1]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("k1", [0.0, 1.0, -1.0]),
        ("k2", [0.0, 0.5, 0.5]),
        ("k3", [0.0, 0.36787944, 0.71828183]),  # exp(-1) + 1 - 1, exp(1) - 1 - 1
        ("abs", [0.0, 1.0, 1.0]),
    ],
)
def test_kl_estimators(name, expected):
    out = KL_ESTIMATORS.get(name)(LOGP, REF)
    assert out.shape == (1, 3)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_k3_nonnegative_and_stable():
    fn = KL_ESTIMATORS.get("k3")
    logp = torch.linspace(-30, 0, 31).unsqueeze(0)
    out = fn(logp, logp.flip(-1))
    assert (out >= 0).all() and torch.isfinite(out).all()
    assert (fn(logp, logp) == 0).all()
    # log-ratio clamped to [-20, 20]
    big = fn(torch.tensor([0.0]), torch.tensor([-100.0]))
    assert big.item() == pytest.approx(math.exp(-20) + 19)
    assert torch.isfinite(fn(torch.tensor([-100.0]), torch.tensor([0.0]))).all()


def test_unknown_kl_lists_names():
    with pytest.raises(ValueError, match="abs, k1, k2, k3"):
        KL_ESTIMATORS.get("k4")

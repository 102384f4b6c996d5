"""Clipped value loss and explained variance, against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from m2flow.algorithms import explained_variance, value_loss

# 4 valid tokens (row 0: 3, row 1: 1); masked entries hold junk
VALUES = [[1.0, 2.0, 5.0], [0.0, 9.0, 9.0]]
OLD = [[0.5, 2.0, 4.0], [0.0, -9.0, 9.0]]
RETURNS = [[2.0, 1.0, 4.5], [1.0, 3.0, float("nan")]]
MASK = [[1, 1, 1], [1, 0, 0]]


def _run(**kw):
    v = torch.tensor(VALUES, requires_grad=True)
    loss, metrics = value_loss(v, torch.tensor(OLD), torch.tensor(RETURNS), torch.tensor(MASK), **kw)
    loss.backward()
    return loss.item(), v.grad, metrics


def test_value_loss_clipped():
    # (0,0): V 1, old 0.5, R 2: unclipped (1-2)^2 = 1; V_clip = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 wins (no grad)
    # (0,1): V = old = 2, R 1: both 1; (0,2): V 5, old 4, R 4.5: unclipped 0.25, V_clip 4.2 -> 0.09, unclipped wins
    # (1,0): V = old = 0, R 1: both 1.   loss = 0.5 * (1.69 + 1 + 0.25 + 1) / 4 = 0.4925
    # grads (token-mean over 4): d/dV 0.5 (V-R)^2 / 4 = (V-R)/4 -> [0, 0.25, 0.125 | -0.25]
    loss, grad, m = _run(clip_range_value=0.2)
    assert loss == pytest.approx(0.4925)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.25, 0.125], [-0.25, 0.0, 0.0]]))
    assert m["vf_clip_frac"] == pytest.approx(0.25)
    assert m["vf_values_mean"] == pytest.approx(2.0)  # (1 + 2 + 5 + 0) / 4


def test_value_loss_unclipped_and_explained_variance():
    # 0.5 * (1 + 1 + 0.25 + 1) / 4 = 0.40625; every valid token gets (V-R)/4
    loss, grad, m = _run()
    assert loss == pytest.approx(0.40625)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.25, 0.125], [-0.25, 0.0, 0.0]]))
    assert m["vf_clip_frac"] == 0.0
    # R = [2, 1, 4.5, 1]: mean 2.125, E[R^2] = 26.25/4 -> var 6.5625 - 4.515625 = 2.046875
    # R - V = [1, -1, -0.5, 1]: mean 0.125, E = 3.25/4 -> var 0.8125 - 0.015625 = 0.796875
    # EV = 1 - 0.796875 / 2.046875 = 1 - 51/131 = 80/131
    assert m["vf_explained_var"] == pytest.approx(80 / 131)


def test_value_loss_seq_mean_aggregation():
    # per-sequence means of the unclipped 0.5 (V-R)^2: row 0 0.5 * 2.25 / 3 = 0.375, row 1 0.5 -> mean 0.4375
    loss, _, _ = _run(loss_agg="seq-mean-token-mean")
    assert loss == pytest.approx(0.4375)


def test_value_loss_rejects_bad_clip():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_range_value"):
        value_loss(x, x, x, torch.ones(1, 1), clip_range_value=0.0)


def test_explained_variance_edges():
    m = torch.tensor([[1, 1, 0]])
    r = torch.tensor([[1.0, 3.0, 100.0]])
    assert explained_variance(r.clone(), r, m).item() == 1.0  # perfect critic
    assert explained_variance(torch.full((1, 3), 2.0), r, m).item() == 0.0  # predicts the mean return
    # constant returns: no variance to explain -> 0, never NaN
    assert explained_variance(torch.tensor([[0.0, 5.0, 0.0]]), torch.ones(1, 3), m).item() == 0.0

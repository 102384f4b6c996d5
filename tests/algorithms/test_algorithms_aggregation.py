import pytest
import torch

from m2flow.algorithms import LOSS_AGGREGATIONS, aggregate_loss, masked_mean, masked_sum

INF = float("inf")
# row 0: 3 valid tokens (1+2+3), row 1: 1 valid token (5), row 2: none; masked entries hold junk
LOSS = [[1.0, 2.0, 3.0, INF], [5.0, 6.0, 7.0, 8.0], [9.0, float("nan"), 9.0, 9.0]]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 11 / 4),  # (1+2+3+5) / 4 tokens
        ("seq-mean-token-mean", 3.5),  # (6/3 + 5/1) / 2 sequences, empty row excluded
        ("seq-mean-token-sum", 5.5),  # (6 + 5) / 2
    ],
)
def test_aggregation_modes(mode, expected):
    loss_mat = torch.tensor(LOSS, requires_grad=True)
    out = aggregate_loss(loss_mat, torch.tensor(MASK), mode)
    assert out.item() == pytest.approx(expected)
    out.backward()
    assert torch.isfinite(loss_mat.grad).all()
    assert (loss_mat.grad[torch.tensor(MASK) == 0] == 0).all()


def test_aggregation_grad_weights():
    loss_mat = torch.tensor(LOSS, requires_grad=True)
    aggregate_loss(loss_mat, torch.tensor(MASK), "seq-mean-token-mean").backward()
    # each valid sequence weighs 1/2, split over its tokens
    torch.testing.assert_close(loss_mat.grad[0], torch.tensor([1 / 6, 1 / 6, 1 / 6, 0.0]))
    torch.testing.assert_close(loss_mat.grad[1], torch.tensor([0.5, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregation_all_masked_is_zero(mode):
    out = aggregate_loss(torch.ones(2, 3), torch.zeros(2, 3), mode)
    assert out.item() == 0.0


def test_unknown_mode_lists_valid_names():
    with pytest.raises(ValueError, match="seq-mean-token-mean.*seq-mean-token-sum.*token-mean"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "sum")
    assert LOSS_AGGREGATIONS.names() == [
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "token-mean",
    ]


def test_masked_mean_and_sum():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[1, 0], [0, 0]])
    assert masked_mean(x, m).item() == 1.0
    assert masked_sum(x, m).item() == 1.0
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(masked_sum(x, m.bool(), dim=0), torch.tensor([1.0, 0.0]))
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0

"""Group filtering, overlong filtering, DAPO soft overlong punishment, reward scaling/clipping."""

from __future__ import annotations

import pytest
import torch

from m2flow.algorithms import informative_groups, overlong_mask, scale_and_clip_rewards, soft_overlong_punishment


def test_informative_groups():
    # group 3: [1, 1] flat; group 9: [0, 1] informative; group 4: [0.5, 0.5] flat; group 8: singleton
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 0.5, 7.0])
    gids = torch.tensor([3, 9, 3, 4, 9, 4, 8])
    keep = informative_groups(scores, gids)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False, False, True, False, False]
    assert informative_groups(torch.zeros(4), torch.tensor([0, 0, 1, 1])).tolist() == [False] * 4


def test_overlong_mask_from_finish_reasons_and_bools():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = overlong_mask(["stop", "length", "stop"], mask)
    assert out.dtype == mask.dtype
    assert out.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    out = overlong_mask(torch.tensor([True, False, True]), mask.long())
    assert out.tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0]] and out.dtype == torch.long


def test_soft_overlong_punishment():
    # max_len 10, buffer 4 -> free up to 6; 7 -> -1/4, 8 -> -2/4, 9 -> -3/4, 10 -> -1, beyond -> -1
    lengths = torch.tensor([3, 6, 7, 8, 9, 10, 12])
    out = soft_overlong_punishment(lengths, max_len=10, buffer_len=4, penalty_factor=1.0)
    assert out.tolist() == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    out = soft_overlong_punishment(lengths, max_len=10, buffer_len=4, penalty_factor=0.5)
    assert out.tolist() == [0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5]
    with pytest.raises(ValueError, match="buffer_len"):
        soft_overlong_punishment(lengths, max_len=10, buffer_len=0)


def test_scale_and_clip_rewards():
    scores = torch.tensor([2.0, -3.0, 0.5])
    assert scale_and_clip_rewards(scores).tolist() == [2.0, -3.0, 0.5]
    assert scale_and_clip_rewards(scores, scale=2.0).tolist() == [4.0, -6.0, 1.0]
    assert scale_and_clip_rewards(scores, scale=2.0, clip=5.0).tolist() == [4.0, -5.0, 1.0]  # scale, then clip
    with pytest.raises(ValueError, match="clip"):
        scale_and_clip_rewards(scores, clip=-1.0)

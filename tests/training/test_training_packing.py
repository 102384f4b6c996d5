"""Sequence packing (issue 13): packed micro-batches compute exactly what padded ones do (logits, logprobs, a
whole update), attention never crosses a sequence, and bins respect the token budget."""

from __future__ import annotations

import copy

import pytest
import torch

from m2flow.batch import RolloutBatch
from m2flow.training.forward import batch_logprobs, response_logits
from m2flow.training.packing import micro_batches, pack, packed_response_logits, token_bins, use_varlen_attention

from test_training_actor import _actor, _prepared, rollout  # noqa: F401 (the module-scoped batch fixture)


@pytest.fixture(scope="module")
def base_model(make_micro_model):
    return make_micro_model(0)


def _layout(plens, tlens, P=6, T=5, seed=0):
    """input_ids and attention_mask laid out [pad | prompt | response | pad]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (len(plens), P + T), generator=g)
    mask = torch.zeros(len(plens), P + T, dtype=torch.long)
    for i, (p, t) in enumerate(zip(plens, tlens)):
        mask[i, P - p: P + t] = 1
    response = torch.zeros(len(plens), T)
    for i, t in enumerate(tlens):
        response[i, :t] = 1
    return ids, mask, response


def test_pack_lays_out_real_tokens_with_restarting_positions():
    ids, mask, _ = _layout([2, 3], [1, 2], P=3, T=2)
    p = pack(ids, mask, response_len=2)
    assert p.input_ids.tolist() == [[*ids[0, 1:4].tolist(), *ids[1, 0:5].tolist()]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert p.cu_seqlens.tolist() == [0, 3, 8] and p.max_len == 5
    # row 0 predicts its one response token from its last prompt token (packed 1); row 1 from packed 5 and 6
    assert p.keep.tolist() == [1, 5, 6]
    assert p.targets.tolist() == [ids[0, 3].item(), ids[1, 3].item(), ids[1, 4].item()]
    assert p.slot.tolist() == [[0, -1], [1, 2]]


def _shared(plens, tlens, groups, P=6, T=5, seed=0):
    """_layout with the rows of each group given the same prompt."""
    ids, mask, response = _layout(plens, tlens, P, T, seed)
    for rows in groups:
        ids[rows[1:], :P] = ids[rows[0], :P]
    return ids, mask, response


def test_pack_computes_a_shared_prompt_once():
    ids, mask, _ = _shared([2, 2, 3], [1, 2, 2], [[0, 1]], P=3, T=2)
    p = pack(ids, mask, response_len=2)
    prompt, r0, r1, row2 = ids[0, 1:3].tolist(), ids[0, 3:4].tolist(), ids[1, 3:5].tolist(), ids[2].tolist()
    assert p.input_ids.tolist() == [prompt + r0 + r1 + row2]
    assert p.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 3, 4]]
    assert p.cu_seqlens is None  # not contiguous runs any more
    # each sequence: its prompt (row 1 reads row 0's copy), then its own response
    assert p.layout.tolist() == [[0, 1, 2, 0, 0], [0, 1, 3, 4, 0], [5, 6, 7, 8, 9]]
    assert p.owner[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert p.owner[1].tolist() == [0, 1, 2, 2, 3, 0, 1, 2, 3, 4]
    # the shared last prompt token (packed 1) predicts the first response token of rows 0 and 1
    assert p.keep.tolist() == [1, 1, 3, 7, 8]
    assert p.targets.tolist() == [r0[0], r1[0], r1[1], row2[3], row2[4]]
    assert p.slot.tolist() == [[0, -1], [1, 2], [3, 4]]
    unshared = pack(ids, mask, response_len=2, share_prompts=False)
    assert unshared.input_ids.shape[1] == 12 and unshared.cu_seqlens.tolist() == [0, 3, 7, 12]


@pytest.mark.parametrize("share", [True, False])
def test_shared_prompt_logits_equal_padded_logits(base_model, share):
    model = copy.deepcopy(base_model)
    use_varlen_attention(model)
    ids, mask, response = _shared([6, 6, 6, 3, 3, 5], [5, 1, 3, 0, 4, 2], [[0, 1, 2], [3, 4]])
    padded = response_logits(model, ids, mask, 5)
    packed = packed_response_logits(model, ids, mask, 5, share_prompts=share)
    diff = ((padded - packed).abs() * response.unsqueeze(-1)).max()
    assert diff < 1e-5, diff
    assert (packed[response == 0] == 0).all()


def test_packed_logits_equal_padded_logits(base_model):
    model = copy.deepcopy(base_model)
    use_varlen_attention(model)
    ids, mask, response = _layout([6, 2, 4, 1, 5], [5, 1, 0, 5, 3])
    padded = response_logits(model, ids, mask, 5)
    packed = packed_response_logits(model, ids, mask, 5)
    assert packed.shape == padded.shape
    diff = ((padded - packed).abs() * response.unsqueeze(-1)).max()
    assert diff < 1e-5, diff
    assert (packed[response == 0] == 0).all()


def test_attention_does_not_cross_sequences(base_model):
    """A sequence's logits do not depend on what it is packed with."""
    model = copy.deepcopy(base_model)
    use_varlen_attention(model)
    ids, mask, response = _layout([3, 4], [4, 4])
    alone = packed_response_logits(model, ids[:1], mask[:1], 5)
    other = ids.clone()
    other[1] = (other[1] + 7) % 200
    together = packed_response_logits(model, other, mask, 5)[:1]
    assert ((alone - together).abs() * response[:1].unsqueeze(-1)).max() < 1e-5


def test_varlen_model_is_unchanged_on_padded_calls(base_model):
    model = copy.deepcopy(base_model)
    ids, mask, _ = _layout([6, 2, 4], [5, 1, 3])
    before = response_logits(model, ids, mask, 5)
    use_varlen_attention(model)
    assert torch.equal(response_logits(model, ids, mask, 5), before)


def test_token_bins_respect_the_budget():
    lengths = [5, 9, 3, 7, 2, 12]
    bins = token_bins(lengths, budget=10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins if len(b) > 1)
    assert [5] in bins  # longer than the budget: alone
    # first-fit decreasing: 12 alone, 9, 7 (+3 fills it to 10), 5 (+2)
    assert bins == [[5], [1], [2, 3], [0, 4]]


def test_micro_batches_bin_whole_groups_by_shared_tokens(rollout):  # noqa: F811
    prompt = rollout.attention_mask[:, :rollout.prompt_width].sum(1)
    response = rollout.attention_mask[:, rollout.prompt_width:].sum(1)
    groups = rollout.group_ids.tolist()
    sizes = {g: int(prompt[groups.index(g)] + response[rollout.group_ids == g].sum()) for g in set(groups)}
    budget = max(sizes.values())  # every group fits; not two of them
    assert budget < sum(sorted(sizes.values())[:2])
    bins = micro_batches(rollout, 4, budget)
    assert sorted(i for rows, _ in bins for i in rows.tolist()) == list(range(len(rollout)))
    assert sorted(sorted({groups[i] for i in rows.tolist()}) for rows, _ in bins) == [[g] for g in sorted(sizes)]
    # a budget below a group's size bins it row by row
    small = micro_batches(rollout, 4, 16)
    assert len(small) > len(bins) and all(len(rows) >= 1 for rows, _ in small)


def test_packed_batch_logprobs_equal_padded(base_model, rollout):  # noqa: F811
    model = copy.deepcopy(base_model)
    use_varlen_attention(model)
    padded = batch_logprobs(model, rollout, 1.0, micro_batch_size=4)
    packed = batch_logprobs(model, rollout, 1.0, micro_batch_size=4, max_tokens=40)
    assert len(micro_batches(rollout, 4, 40)) > 1
    assert (padded - packed).abs().max() < 1e-5


@pytest.mark.parametrize("fsdp,budget", [(False, 48), (True, 48), (False, 1000)])
def test_packed_update_equals_padded_update(base_model, rollout, fsdp, budget):  # noqa: F811
    """48 tokens: groups binned row by row, samples of a prompt sharing it within a bin; 1000: one bin."""
    padded = _actor(copy.deepcopy(base_model), fsdp=fsdp, micro_batch_size=3)
    packed = _actor(copy.deepcopy(base_model), fsdp=fsdp, max_tokens_per_microbatch=budget)
    m_padded = padded.update(_prepared(padded, rollout))
    m_packed = packed.update(_prepared(packed, rollout))
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-4, abs=1e-6), key
    a, b = padded.state_dict(), packed.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

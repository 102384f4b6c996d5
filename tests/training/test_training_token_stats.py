"""Memory-lean logprobs and entropy (issue 13): chunked through the LM head, with the gradient, they equal
the full-logits computation; the head keeps the tied weight and the checkpoint's names."""

from __future__ import annotations

import copy

import pytest
import torch

from m2flow.algorithms import entropy_from_logits
from m2flow.training.forward import response_logits, response_token_stats, token_logprobs
from m2flow.training.packing import use_varlen_attention
from m2flow.training.token_stats import LeanLMHead, use_lean_head

from test_training_actor import _actor, _prepared, rollout  # noqa: F401 (the module-scoped batch fixture)
from test_training_packing import _layout


@pytest.fixture(scope="module")
def base_model(make_micro_model):
    return make_micro_model(0)


def test_lean_head_keeps_the_tied_weight_and_names(base_model):
    model = copy.deepcopy(base_model)
    names = set(model.state_dict())
    use_lean_head(model, chunk=4)
    assert isinstance(model.lm_head, LeanLMHead)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(model.state_dict()) == names
    hidden = torch.randn(2, 3, model.config.hidden_size)
    assert torch.equal(model.lm_head(hidden), hidden @ model.lm_head.weight.T)  # no request: plain logits


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stats_equal_full_logits(base_model, packed, temperature):
    full = copy.deepcopy(base_model)
    lean = copy.deepcopy(base_model)
    use_lean_head(lean, chunk=5, one_pass_elements=0)  # several chunks, even for the micro vocabulary
    if packed:
        use_varlen_attention(full)
        use_varlen_attention(lean)
    ids, mask, response = _layout([6, 2, 4, 1, 5], [5, 1, 0, 5, 3])
    logits = response_logits(full, ids, mask, 5, packed)
    expected_lp = token_logprobs(logits, ids[:, -5:], temperature) * response
    expected_ent = entropy_from_logits(logits) * response
    logprobs, entropy = response_token_stats(lean, ids, mask, 5, temperature, packed)
    assert (logprobs * response - expected_lp).abs().max() < 1e-5
    assert (entropy * response - expected_ent).abs().max() < 1e-5


@pytest.mark.parametrize("fsdp", [False, True])
def test_lean_update_equals_full_logits_update(base_model, rollout, fsdp):  # noqa: F811
    """With an entropy bonus, so the entropy's gradient goes through the chunks too."""
    from m2flow.config import AlgorithmConfig, TrainConfig
    from m2flow.training.actor import Actor

    def actor(chunk: int) -> Actor:
        train = TrainConfig(fsdp=fsdp, lr=1e-3, logits_chunk_tokens=chunk, max_tokens_per_microbatch=64)
        return Actor(copy.deepcopy(base_model), train, AlgorithmConfig(entropy_coef=0.01))

    full, lean = actor(0), actor(7)
    lean.model.lm_head.one_pass_elements = 0  # chunks of 7 tokens under checkpointing, even for the micro vocabulary
    m_full = full.update(_prepared(full, rollout))
    m_lean = lean.update(_prepared(lean, rollout))
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert m_lean[key] == pytest.approx(m_full[key], rel=1e-4, abs=1e-6), key
    a, b = full.state_dict(), lean.state_dict()
    # Adam moves every weight by about lr = 1e-3: the two agree to 1% of one step (float rounding of the sums)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_small_logits_take_one_pass(base_model):
    """Below chunk x 32,768 logits the head computes them at once: the same numbers as the chunked path."""
    ids, mask, response = _layout([6, 2, 4], [5, 1, 3])
    stats = {}
    for name, one_pass in (("chunked", 0), ("one pass", None)):
        model = copy.deepcopy(base_model)
        use_lean_head(model, chunk=4, one_pass_elements=one_pass)
        stats[name] = response_token_stats(model, ids, mask, 5, 1.0)
    for a, b in zip(stats["chunked"], stats["one pass"]):
        assert ((a - b).abs() * response).max() < 1e-6

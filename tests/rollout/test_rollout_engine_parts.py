"""The engine's parts on their own: the model against transformers (Qwen2 and Llama variants), the
sampler against the softmax, the block manager's reference counts and prefix reuse."""

from __future__ import annotations

import math

import pytest
import torch

from m2flow.rollout.block_manager import BlockManager
from m2flow.rollout.engine import load_model
from m2flow.rollout.model import ModelArgs
from m2flow.rollout.model_runner import ModelRunner
from m2flow.rollout.sampler import sample, truncate, uniform_noise
from m2flow.rollout.sequence import SeqParams, Sequence
from m2flow.training.checkpoint import save_hf_checkpoint

GREEDY = SeqParams(0.0, 1.0, 0, 8, frozenset(), (), 0)


def _prefill_logprobs(model, ids: list[list[int]]) -> torch.Tensor:
    """Log-softmax of our model's next-token logits after each prompt, via one prefill step."""
    runner = ModelRunner(model, block_size=4, num_blocks=64)
    manager = BlockManager(64, 4)
    seqs = [Sequence(i, list(t), len(t), GREEDY) for i, t in enumerate(ids)]
    for s in seqs:
        manager.allocate(s)
    captured = {}
    original = model.logits
    model.logits = lambda h: captured.setdefault("logits", original(h))
    try:
        runner.run(seqs, is_prefill=True)
    finally:
        del model.logits
    return torch.log_softmax(captured["logits"], -1)


def _hf_last_logprobs(hf_model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.log_softmax(hf_model(torch.tensor([t])).logits[0, -1].float(), -1) for t in ids])


LLAMA_VARIANTS = {
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_family_matches_transformers(variant, tmp_path):
    """Untied embeddings, no q/k/v bias (or bias), rope scaling variants, head_dim != hidden / heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.2, **LLAMA_VARIANTS[variant])
    hf = LlamaForCausalLM(cfg).eval()
    path = save_hf_checkpoint(str(tmp_path / "llama"), cfg, hf.state_dict())
    ours = load_model(path)
    assert not ours.args.tie_word_embeddings and ours.args.head_dim == 16
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 23, 60)]  # past 16: scaling matters
    torch.testing.assert_close(_prefill_logprobs(ours, ids), _hf_last_logprobs(hf, ids), atol=1e-4, rtol=0)


def test_unsupported_architectures_and_rope_types_are_named():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen2ForCausalLM"):
        ModelArgs.from_hf({**base, "architectures": ["GPT2LMHeadModel"]})
    from m2flow.rollout.model import rope_inv_freq

    args = ModelArgs.from_hf({**base, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        rope_inv_freq(args)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


# ---- sampler ---------------------------------------------------------------------------------------------


def test_sampled_frequencies_follow_the_softmax():
    """20,000 draws (one per seed) from a fixed 5-token distribution at T = 0.5: frequencies within 4
    standard errors of softmax(logits / T), and the logprob is that of the scaled softmax."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    rows = logits.expand(n, 5)
    tokens, logprobs = sample(rows, temperature=torch.full((n,), 0.5), top_k=torch.zeros(n, dtype=torch.long),
                              top_p=torch.ones(n), seeds=torch.arange(n), positions=torch.zeros(n, dtype=torch.long))
    p = torch.softmax(logits / 0.5, -1)
    freq = torch.bincount(tokens, minlength=5).float() / n
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4 * stderr + 1e-4).all(), (freq, p)
    torch.testing.assert_close(logprobs, p.log()[tokens])


def test_noise_is_uniform_and_varies_with_seed_position_and_token():
    u = uniform_noise(torch.arange(200), torch.zeros(200, dtype=torch.long), 300)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    v = uniform_noise(torch.arange(200), torch.ones(200, dtype=torch.long), 300)
    assert (u != v).float().mean() > 0.99
    assert (u[:, 1:] != u[:, :-1]).float().mean() > 0.99


def test_truncate_by_hand():
    # softmax of [ln 4, ln 3, ln 2, ln 1] = [0.4, 0.3, 0.2, 0.1]
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).log()[:, [3, 2, 1, 0]]
    inf = float("-inf")

    def kept(top_k, top_p):
        out = truncate(logits, torch.tensor([top_k]), torch.tensor([top_p]))
        return (out > inf).int().tolist()[0]

    assert kept(0, 1.0) == [1, 1, 1, 1]
    assert kept(2, 1.0) == [1, 1, 0, 0]
    assert kept(0, 0.5) == [1, 1, 0, 0]  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert kept(0, 0.4) == [1, 0, 0, 0]  # mass before the 2nd token is 0.4, not > 0.4
    assert kept(0, 0.75) == [1, 1, 1, 0]
    assert kept(3, 0.95) == [1, 1, 1, 0]  # top-k first, then the nucleus of the renormalised rest
    assert kept(0, 1e-9) == [1, 0, 0, 0]  # never empty


def test_greedy_rows_ignore_noise_and_give_raw_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    tokens, logprobs = sample(logits, torch.tensor([0.0, 2.0]), torch.zeros(2, dtype=torch.long), torch.ones(2),
                              torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long))
    assert tokens[0] == 1
    assert logprobs[0].item() == pytest.approx(3 - math.log(1 + math.exp(3) + math.exp(1)), abs=1e-6)
    assert logprobs[1].item() == pytest.approx(torch.log_softmax(logits[1] / 2, -1)[tokens[1]].item(), abs=1e-6)


# ---- block manager ---------------------------------------------------------------------------------------


def _seq(i, tokens):
    return Sequence(i, list(tokens), len(tokens), GREEDY)


def test_prefix_blocks_are_shared_counted_and_reused_after_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = _seq(0, range(10)), _seq(1, range(10))  # blocks [0-3] [4-7] [8-9]
    bm.allocate(a)
    assert a.num_cached_tokens == 0 and bm.num_free == 7
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and bm.num_free == 6
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 10
    c = _seq(2, list(range(8)) + [99])  # same first two blocks: reused from the free list
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and bm.num_free == 7
    # the block holding a sequence's last token is never taken from the cache
    d = _seq(3, range(8))
    assert len(bm.cached_prefix(d)) == 1
    bm.reset_prefix_cache()
    assert bm.cached_prefix(_seq(4, range(10))) == []


def test_a_fork_shares_the_full_blocks_and_owns_a_partial_last_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = _seq(0, range(10)), _seq(1, range(10))  # blocks [0-3] [4-7] [8-9]
    bm.allocate(a)
    assert bm.fork_blocks_needed(b) == 1
    bm.fork(b, a)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1] and bm.num_free == 6
    c, d = _seq(2, range(20, 28)), _seq(3, range(20, 28))  # ends on a block boundary: all blocks shared
    bm.allocate(c)
    assert bm.fork_blocks_needed(d) == 0
    bm.fork(d, c)
    assert d.block_table == c.block_table and bm.num_free == 4
    for s in (a, b, c, d):
        bm.free(s)
    assert bm.num_free == 10 and all(block.ref_count == 0 for block in bm.blocks)
    with pytest.raises(AssertionError):
        bm.fork(_seq(4, range(9)), a)  # not the same tokens


def test_decode_blocks_are_appended_and_registered_when_full():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = _seq(0, [1, 2, 3])
    bm.allocate(s)
    assert len(s.block_table) == 2
    s.token_ids.append(4)  # position 3 fits the second block
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2
    bm.on_block_filled(s)  # [3, 4] is full now: reusable by a later sequence
    assert len(bm.cached_prefix(_seq(1, [1, 2, 3, 4, 5]))) == 2
    s.token_ids.append(5)
    bm.append_slot(s)
    assert len(s.block_table) == 3 and bm.num_free == 1


def test_rope_settings_read_from_both_config_formats():
    """transformers >= 5 writes `rope_parameters`; hub checkpoints (Qwen2.5, R1-Distill) `rope_theta` +
    `rope_scaling`. Both give the same arguments."""
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                architectures=["Qwen2ForCausalLM"])
    scaling = {"rope_type": "linear", "factor": 4.0}
    new = ModelArgs.from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 1e6}})
    old = ModelArgs.from_hf({**base, "rope_theta": 1e6, "rope_scaling": scaling})
    assert new == old and new.rope_theta == 1e6 and new.rope_scaling == scaling
    plain = ModelArgs.from_hf({**base, "rope_theta": 1e6, "rope_scaling": None})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    assert ModelArgs.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}).rope_theta == 5.0


def test_generate_stats_add_up_and_become_metrics():
    from m2flow.rollout import GenerateStats

    a = GenerateStats(prompt_tokens=100, prefill_tokens=30, forks=7, preemptions=0, prefill_steps=1, decode_steps=10,
                      decode_rows=64, seconds=1.5)
    b = GenerateStats(prompt_tokens=60, prefill_tokens=50, forks=0, preemptions=2, prefill_steps=3, decode_steps=6,
                      decode_rows=32, seconds=0.25)
    total = a + b
    assert total == GenerateStats(160, 80, 7, 2, 4, 16, 96, 1.75)
    assert total.metrics() == {"rollout/prefill_compute_frac": 0.5, "rollout/preemptions": 2.0,
                               "rollout/decode_steps": 16.0, "rollout/decode_batch_mean": 6.0,
                               "rollout/engine_seconds": 1.75}
    assert GenerateStats().metrics()["rollout/decode_batch_mean"] == 0.0  # no steps: no division by zero

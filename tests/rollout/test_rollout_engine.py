"""m2flow's own engine against HF: greedy tokens, logprobs, batching / prefix sharing / preemption
invariance, seeds, finish reasons, weight updates and sleep/wake."""

from __future__ import annotations

import copy

import pytest
import torch

from m2flow.batch import RolloutBatch
from m2flow.rollout import GenerateStats, HFEngine, SamplingParams
from m2flow.rollout.engine import Engine, EngineConfig
from m2flow.training.checkpoint import save_hf_checkpoint
from m2flow.training.forward import response_logits, token_logprobs

STOP_RANGE = list(range(100, 140))


@pytest.fixture(scope="module")
def hf_model(micro_config):
    """A random micro Qwen2 with a large init scale: peaked, varied next-token distributions, so greedy
    outputs differ between prompts and stop at EOS at different lengths."""
    from m2flow.models.tiny import make_tiny_model

    cfg = copy.deepcopy(micro_config)
    cfg.initializer_range = 0.25
    torch.set_num_threads(1)
    return make_tiny_model(cfg, seed=3).eval()


@pytest.fixture(scope="module")
def model_dir(hf_model, tokenizer, tmp_path_factory):
    return save_hf_checkpoint(str(tmp_path_factory.mktemp("micro") / "model"), hf_model.config,
                              hf_model.state_dict(), tokenizer)


def make_engine(model_dir: str, **config) -> Engine:
    return Engine.from_pretrained(model_dir, EngineConfig(**config))


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir)


@pytest.fixture(scope="module")
def prompts(chat_prompts, tokenizer):
    out = chat_prompts(56, seed=4)
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in out}
    assert len(lengths) >= 10, "prompts of varied lengths"
    return out


def _tokens(samples):
    return [s.token_ids for s in samples]


def _trainer_logprobs(model, samples, tokenizer, temperature):
    batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
        lp = token_logprobs(logits, batch.input_ids[:, batch.prompt_width :], temperature)
    mask = batch.response_mask.bool()
    return lp[mask], batch.rollout_logprobs[mask]


def test_greedy_matches_hf_generate(engine, hf_model, tokenizer, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    ours = engine.generate(prompts, params)
    ref = HFEngine(hf_model, tokenizer).generate(prompts, params)
    assert len(ours) == len(prompts) >= 50
    assert _tokens(ours) == _tokens(ref)
    assert [s.finish_reason for s in ours] == [s.finish_reason for s in ref]
    # the test is not vacuous: outputs differ between prompts and some stop at EOS
    assert len({tuple(t) for t in _tokens(ours)}) > len(prompts) // 2
    assert {s.finish_reason for s in ours} == {"stop", "length"}
    for a, b in zip(ours, ref):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.9, 20)])
def test_logprobs_match_trainer_forward(engine, hf_model, tokenizer, prompts, temperature, top_p, top_k):
    """Behaviour logprobs are log softmax(logits / T) of the full distribution (before top-p / top-k)."""
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16, seed=2)
    samples = engine.generate(prompts[:12], params)
    trainer, rollout = _trainer_logprobs(hf_model, samples, tokenizer, temperature)
    assert rollout.numel() > 100
    torch.testing.assert_close(rollout, trainer, atol=1e-4, rtol=0)


def test_top_k_and_top_p_restrict_the_sampled_tokens(engine, hf_model, tokenizer, prompts):
    """With top_k = 1 sampling is greedy; a tiny top_p keeps only the most likely token as well."""
    greedy = engine.generate(prompts[:8], SamplingParams(temperature=0.0, max_new_tokens=10))
    for params in (SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10, seed=0),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=0)):
        assert _tokens(engine.generate(prompts[:8], params)) == _tokens(greedy)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_results_do_not_depend_on_batching_prefix_sharing_or_preemption(model_dir, prompts, temperature):
    params = SamplingParams(n=4, temperature=temperature, max_new_tokens=20, seed=9)
    reference = make_engine(model_dir).generate(prompts[:10], params)
    variants = {
        "no prefix sharing": dict(prefix_caching=False),
        "one sequence at a time": dict(max_num_seqs=1),
        "small prefill budget": dict(max_num_batched_tokens=40, block_size=4),
    }
    for name, config in variants.items():
        out = make_engine(model_dir, **config).generate(prompts[:10], params)
        assert _tokens(out) == _tokens(reference), name
        for a, b in zip(out, reference):  # (without prefix sharing each sample computes its own prompt)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # a KV budget of a few sequences forces preemption and recomputation
    tiny = make_engine(model_dir, block_size=4, kv_cache_gb=40 * 4 * 256 / 2**30)  # 256 B of KV per token
    assert tiny.num_blocks == 40
    out = tiny.generate(prompts[:10], params)
    assert tiny.stats.preemptions == tiny.batcher.num_preemptions > 0
    assert _tokens(out) == _tokens(reference)
    for a, b in zip(out, reference):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # other batch compositions: more prompts in the same call (seeds follow the prompt's index in the call)
    more = make_engine(model_dir).generate(prompts[:16], params)
    assert _tokens(more[:40]) == _tokens(reference)
    if temperature == 0:  # greedy does not depend on the order either
        backwards = make_engine(model_dir).generate(prompts[:10][::-1], params)
        assert _tokens(backwards) == [t for i in range(9, -1, -1) for t in _tokens(reference)[4 * i : 4 * i + 4]]


def test_same_seed_same_samples(engine, prompts):
    def run(seed):
        return engine.generate(prompts[:6], SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=seed))

    a, b, c = run(1), run(1), run(2)
    assert _tokens(a) == _tokens(b) and [s.logprobs for s in a] == [s.logprobs for s in b]
    assert _tokens(a) != _tokens(c)
    # the n samples of a prompt differ from one another
    assert len({tuple(s.token_ids) for s in a[:4]}) > 1


def test_n_samples_share_the_prompt_blocks(model_dir, prompts, tokenizer):
    engine = make_engine(model_dir, block_size=4)
    ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    engine.generate([prompts[0]], SamplingParams(n=1, temperature=0.0, max_new_tokens=1))
    before = engine.block_manager.num_free
    engine.generate([prompts[0]], SamplingParams(n=1, temperature=0.0, max_new_tokens=1))
    assert engine.block_manager.num_free == before  # everything freed after a call
    # while 8 samples of one prompt run, the prompt's full blocks are held once, not 8 times
    seqs = []
    original_finish = engine.batcher.finish

    def spy(seq, reason):
        seqs.append(list(seq.block_table))
        original_finish(seq, reason)

    engine.batcher.finish = spy
    engine.generate([prompts[0]], SamplingParams(n=8, temperature=1.0, max_new_tokens=3, seed=0, ignore_eos=True))
    shared = len(ids) // 4  # the prompt's full blocks
    assert shared >= 2 and len(ids) % 4
    assert all(t[:shared] == seqs[0][:shared] for t in seqs)
    assert len({t[shared] for t in seqs}) == 8  # the partial block with the last prompt tokens is per sample


def test_n_samples_compute_their_prompt_once(model_dir, prompts, tokenizer):
    """The n samples of a prompt prefilled in one step fork the first: the prompt's tokens are computed once,
    and the forks' copy of its partial last block holds the same KV."""
    computed = []

    def counting_engine():
        engine = make_engine(model_dir, block_size=4)
        original = engine.runner._compute_prefill

        def spy(seqs):
            computed.append(sum(len(s) - s.num_computed_tokens for s in seqs))
            return original(seqs)

        engine.runner._compute_prefill = spy
        return engine

    counting_engine().generate(prompts[:3], SamplingParams(n=1, max_new_tokens=1))
    engine = counting_engine()
    kv_of_last_block = {}
    original_run = engine.runner.run

    def run(seqs, is_prefill):  # the KV of each sample's partial last block, right after the prefill
        out = original_run(seqs, is_prefill)
        if is_prefill:
            for s in seqs:
                rows = (len(s) - 1) % 4 + 1
                kv_of_last_block[s.id] = engine.runner.kv_cache[:, :, s.block_table[-1], :, :rows].clone()
        return out

    engine.runner.run = run
    out = engine.generate(prompts[:3], SamplingParams(n=5, temperature=1.0, max_new_tokens=4, seed=0, ignore_eos=True))
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[:3]]
    assert computed[1:] == computed[:1]  # as for one sample each (the prompts share a prefix: fewer than their tokens)
    assert computed[0] > 0.5 * sum(lengths)
    # the engine's own account of the call (the RL runner logs it)
    assert engine.stats.seconds > 0
    assert engine.stats == GenerateStats(prompt_tokens=5 * sum(lengths), prefill_tokens=computed[1], forks=12,
                                         preemptions=0, prefill_steps=1, decode_steps=3, decode_rows=15 * 3,
                                         seconds=engine.stats.seconds)
    assert len({tuple(s.token_ids) for s in out[:5]}) > 1  # the samples still differ
    by_prompt = [list(kv_of_last_block.values())[5 * i : 5 * i + 5] for i in range(3)]
    for group in by_prompt:
        assert group[0].abs().sum() > 0 and all(torch.equal(kv, group[0]) for kv in group)


def test_finish_reasons_and_stop_strings(engine, tokenizer, prompts):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=0, stop_token_ids=STOP_RANGE)
    samples = engine.generate(prompts[:8], params)
    stops = {tokenizer.eos_token_id, *STOP_RANGE}
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    for s in samples:
        assert not any(t in stops for t in s.token_ids[:-1])
        assert len(s.logprobs) == len(s.token_ids)
        if s.finish_reason == "length":
            assert len(s.token_ids) == 8
        else:
            assert s.token_ids[-1] in stops
        assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True)
    # stop strings: the response ends with the token that completes the string
    free = engine.generate(prompts[:8], SamplingParams(temperature=0.0, max_new_tokens=24))
    text = next(s.text for s in free if len(s.text) >= 6)
    stop = text[3:5]
    out = engine.generate(prompts[:8], SamplingParams(temperature=0.0, max_new_tokens=24, stop_strings=[stop]))
    hit = [s for s in out if s.finish_reason == "stop" and stop in s.text]
    assert hit
    for s in hit:
        assert stop not in tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True)
    # ignore_eos generates exactly max_new_tokens
    fixed = engine.generate(prompts[:8], SamplingParams(temperature=1.0, max_new_tokens=9, seed=0, ignore_eos=True))
    assert {len(s.token_ids) for s in fixed} == {9} and {s.finish_reason for s in fixed} == {"length"}


def test_weight_update_in_place_drops_cached_prefixes(model_dir, micro_config, tokenizer, prompts, tmp_path):
    from m2flow.models.tiny import make_tiny_model

    other_cfg = copy.deepcopy(micro_config)
    other_cfg.initializer_range = 0.25
    other = make_tiny_model(other_cfg, seed=11).eval()
    other_dir = save_hf_checkpoint(str(tmp_path / "other"), other.config, other.state_dict(), tokenizer)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=4)
    engine = make_engine(model_dir)
    engine.generate(prompts[:5], params)  # fills the prefix cache with the old weights' KV
    cache_before = engine.runner.kv_cache.data_ptr()
    engine.load_weights(other.state_dict(), policy_version=3)
    out = engine.generate(prompts[:5], params)
    expected = make_engine(other_dir).generate(prompts[:5], params)
    assert _tokens(out) == _tokens(expected)
    assert {s.policy_version for s in out} == {3}
    assert engine.runner.kv_cache.data_ptr() == cache_before
    # streamed buckets work too, and bad names / shapes are refused
    engine.load_weights(iter(list(other.state_dict().items())[:3]), policy_version=4)
    with pytest.raises(ValueError, match="does not belong"):
        engine.load_weights({"model.nope.weight": torch.zeros(1)}, policy_version=5)
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights({"model.norm.weight": torch.zeros(3)}, policy_version=5)


def test_sleep_frees_the_kv_cache_and_wake_restores(model_dir, prompts):
    engine = make_engine(model_dir)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1)
    before = engine.generate(prompts[:4], params)
    engine.sleep()
    assert engine.runner.kv_cache is None
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts[:4], params)
    engine.wake()
    assert _tokens(engine.generate(prompts[:4], params)) == _tokens(before)


def test_context_switch_parts_move_apart(model_dir, prompts):
    """The parts context switching moves (scheduler/context.py): their bytes; weights alone (a weight sync) do not
    make the engine ready to generate; a remade KV cache gives the same samples."""
    engine = make_engine(model_dir)
    weights = sum(t.numel() * t.element_size() for t in (*engine.model.parameters(), *engine.model.buffers()))
    kv = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
    assert engine.part_bytes() == {"weights": float(weights), "kv_cache": float(kv)} and kv > 0
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3)
    before = engine.generate(prompts[:2], params)
    engine.offload({"kv_cache", "weights"})
    assert engine.part_bytes()["kv_cache"] == 0.0
    engine.onload({"weights"})
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts[:2], params)
    engine.onload({"kv_cache"})
    assert engine.part_bytes()["kv_cache"] == float(kv)
    assert _tokens(engine.generate(prompts[:2], params)) == _tokens(before)


def test_config_errors(model_dir, prompts, tokenizer):
    with pytest.raises(ValueError, match="kv_cache_gb"):
        make_engine(model_dir, kv_cache_gb=1e-9)
    engine = make_engine(model_dir, max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(["x" * 40], SamplingParams())
    # a response stops at max_model_len
    short = tokenizer.decode(tokenizer(prompts[0], add_special_tokens=False)["input_ids"][:10])
    out = engine.generate([short], SamplingParams(temperature=1.0, max_new_tokens=50, seed=0, ignore_eos=True))
    assert len(out[0].prompt_ids) + len(out[0].token_ids) == 16 and out[0].finish_reason == "length"


@pytest.mark.parametrize("fail_at_call", [1, 3])  # during the prefill (blocks registered, never written), a decode
def test_refused_or_interrupted_calls_leave_the_engine_clean(model_dir, prompts, fail_at_call):
    engine = make_engine(model_dir, block_size=4, kv_cache_gb=40 * 4 * 256 / 2**30)  # 40 blocks = 160 tokens
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=0)
    expected = engine.generate(prompts[:3], params)
    with pytest.raises(ValueError, match="needs 4[0-9] KV blocks but the cache has only 40"):
        engine.generate(prompts[:3], SamplingParams(max_new_tokens=150))  # could outgrow the whole cache
    assert engine.batcher.is_finished() and engine.block_manager.num_free == 40

    calls = {"n": 0}
    run = engine.runner.run

    def failing_run(seqs, is_prefill):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            raise KeyboardInterrupt
        return run(seqs, is_prefill)

    engine.runner.run = failing_run
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts[3:6], params)  # new prompts: their blocks are registered in this call
    engine.runner.run = run
    assert engine.batcher.is_finished() and engine.block_manager.num_free == 40
    fresh = make_engine(model_dir, block_size=4, kv_cache_gb=40 * 4 * 256 / 2**30)
    assert _tokens(engine.generate(prompts[3:6], params)) == _tokens(fresh.generate(prompts[3:6], params))
    assert _tokens(engine.generate(prompts[:3], params)) == _tokens(expected)


def test_groups_stream_out_as_they_finish(model_dir, prompts, tokenizer):
    """stream_groups: each prompt's n samples come out together as soon as the last of them finishes, while other
    sequences still decode; the groups are exactly generate()'s samples; closing the stream early leaves the
    engine clean."""
    engine = make_engine(model_dir, block_size=4, kv_cache_gb=200 * 4 * 256 / 2**30)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[:8]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=24, seed=5, stop_token_ids=STOP_RANGE)
    whole = engine.generate_ids(ids, params)
    streamed, still_running = [], []
    for group in engine.stream_groups(ids, params):
        streamed.append(group)
        still_running.append(not engine.batcher.is_finished())
    assert sorted(g[0].prompt_index for g in streamed) == list(range(8))
    assert all(len(g) == 3 and {s.prompt_index for s in g} == {g[0].prompt_index} for g in streamed)
    in_order = [s for g in sorted(streamed, key=lambda g: g[0].prompt_index) for s in g]
    assert _tokens(in_order) == _tokens(whole)  # (logprobs to float rounding: the second call reuses cached prefixes)
    assert max(abs(a - b) for x, y in zip(in_order, whole) for a, b in zip(x.logprobs, y.logprobs)) < 1e-4
    assert still_running[0] and not still_running[-1]  # the first group came out while others were decoding
    assert [g[0].prompt_index for g in streamed] != list(range(8))  # in the order they finished, not prompt order
    stream = engine.stream_groups(ids, params)
    next(stream)
    stream.close()  # the consumer stops early: the rest is dropped, the blocks freed
    assert engine.batcher.is_finished() and engine.block_manager.num_free == 200
    assert _tokens(engine.generate_ids(ids, params)) == _tokens(whole)


def test_bfloat16_engine_runs_and_tracks_the_bf16_trainer(model_dir, hf_model, tokenizer, prompts):
    """bf16 weights and KV cache, float32 rotary frequencies and sampling; logprobs close to transformers in
    bf16 (not equal: the op order differs, which is what algorithm.tis_cap corrects for)."""
    engine = Engine.from_pretrained(model_dir, dtype="bfloat16")
    assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.runner.kv_cache.dtype == torch.bfloat16
    # the rotary table: computed in float32 and rounded to bf16, exactly as transformers' bf16 forward does
    positions = torch.arange(engine.max_model_len)[None]
    cos, sin = hf_model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), positions)
    half = cos.shape[-1] // 2
    assert engine.model.rope_cache.dtype == torch.bfloat16
    assert torch.equal(engine.model.rope_cache, torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1))
    samples = engine.generate(prompts[:8], SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=0))
    trainer, rollout = _trainer_logprobs(copy.deepcopy(hf_model).to(torch.bfloat16), samples, tokenizer, 1.0)
    assert torch.isfinite(rollout).all() and rollout.numel() > 50
    assert (trainer - rollout).abs().mean() < 0.05  # measured 0.017


@pytest.mark.parametrize("backend", ["m2flow", "hf"])
def test_rollout_worker_reports_the_engine_stats(model_dir, prompts, backend):
    """The RL runner's rollout worker hands the engine's GenerateStats over (None with transformers)."""
    from m2flow.config import load_config
    from m2flow.scheduler.workers import RolloutWorker, Start

    cfg = load_config(None, [f"rollout.backend={backend}"])
    worker = RolloutWorker(Start.of(model_dir, cfg), cfg.rollout)
    samples = worker.generate(prompts[:2], SamplingParams(n=3, max_new_tokens=4, seed=0))
    assert len(samples) == 6
    stats = worker.stats()
    if backend == "hf":
        assert stats is None
    else:
        assert stats.forks == 4 and stats.prompt_tokens == 3 * sum(len(s.prompt_ids) for s in samples[::3])

"""Engine replicas (issue 14): a generate call split across replicas gives the samples of one engine, token
for token (logprobs to float rounding), because each sample is seeded by its global prompt index."""

from __future__ import annotations

import pytest
import ray

from m2flow.config import ConfigError, load_config
from m2flow.rollout import Engine, SamplingParams
from m2flow.scheduler.group import WorkerGroup, expected_work, generate_on_replicas, split_by_work

PARAMS = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=7)


def _same(a, b) -> bool:
    """Identical token ids; logprobs equal to float rounding (a batch of another shape can round the last bit
    differently: up to 5e-7 seen on CPU)."""
    if [(s.prompt_index, s.token_ids) for s in a] != [(s.prompt_index, s.token_ids) for s in b]:
        return False
    return max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs)) < 1e-5


def test_split_call_equals_one_call(make_micro_model, tokenizer, chat_prompts):
    model, prompts = make_micro_model(0), chat_prompts(6)
    one = Engine.from_model(model, tokenizer).generate(prompts, PARAMS)
    two = []
    for start, stop in ((0, 2), (2, 6)):
        part = Engine.from_model(model, tokenizer).generate(prompts[start:stop], PARAMS, first_index=start)
        for s in part:
            s.prompt_index += start
        two += part
    assert _same(one, two)
    shifted = Engine.from_model(model, tokenizer).generate(prompts[2:6], PARAMS)  # without the offset: other seeds
    assert [s.token_ids for s in shifted] != [s.token_ids for s in one[6:]]


def test_split_by_work():
    assert split_by_work([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_by_work([3, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert split_by_work([1, 1], 3) == [range(0, 1), range(1, 2)]  # fewer items than replicas
    assert split_by_work([5, 0, 0], 3) == [range(0, 1), range(1, 2), range(2, 3)]  # every replica gets one
    assert split_by_work([], 2) == []
    # a prompt's expected work: its tokens once, n samples of up to max_new_tokens
    work = expected_work([100, 10, 10, 10], SamplingParams(n=2, max_new_tokens=20))
    assert work == [140.0, 50.0, 50.0, 50.0]
    assert split_by_work(work, 2) == [range(0, 1), range(1, 4)]  # the long prompt's replica takes nothing else


def test_two_replicas_equal_one(tmp_path, make_micro_model, tokenizer, chat_prompts):
    from m2flow.scheduler.cluster import start_ray, stop_ray
    from m2flow.scheduler.workers import RolloutWorker, Start
    from m2flow.training.checkpoint import save_hf_checkpoint

    model = make_micro_model(0)
    path = save_hf_checkpoint(str(tmp_path / "m"), model.config, model.state_dict(), tokenizer)
    cfg = load_config(None, [f"model.path={path}", "rollout.engine.kv_cache_gb=0.05"])
    started = not ray.is_initialized()
    start_ray(cfg.cluster)
    prompts = chat_prompts(5)
    groups = [WorkerGroup(RolloutWorker, k, Start.of(path, cfg), cfg.rollout, name=f"replicas-test-{k}", threads=1)
              for k in (1, 2)]
    try:
        one, two = (generate_on_replicas(g, prompts, PARAMS) for g in groups)
        assert len(two) == 15 and _same(one, two)
        by_work = generate_on_replicas(groups[1], prompts, PARAMS, prompt_tokens=[500, 1, 1, 1, 1])  # split 1 | 4
        assert _same(one, by_work)  # the samples do not depend on the split
        # streamed: both replicas put each finished group into one channel; a consumer takes its quota of 5
        from m2flow.scheduler.channel import Channel

        channel = Channel("replicas-test", capacity=2, timeout_s=120)  # smaller than the stream: back-pressure
        puts = [rank.generate_into.remote(channel, prompts[a:b], PARAMS, first_index=a)
                for rank, (a, b) in zip(groups[1].ranks, [(0, 2), (2, 5)])]
        streamed = [channel.get() for _ in range(5)]
        done = ray.get(puts)  # (groups put, the call's engine stats, its timeline spans)
        assert sorted(d[0] for d in done) == [2, 3]
        assert all(d[1].prompt_tokens > 0 and [s.stage for s in d[2]][0] == "generate" for d in done)
        assert all(len(g) == 3 and len({s.prompt_index for s in g}) == 1 for g in streamed)
        assert _same(one, [s for g in sorted(streamed, key=lambda g: g[0].prompt_index) for s in g])
        channel.close()
        stats = groups[1].call("stats")
        assert len(stats) == 2 and all(s.prompt_tokens > 0 for s in stats)  # both replicas worked
    finally:
        for g in groups:
            g.kill()
        if started:  # leave Ray as the test found it (later tests start their own)
            stop_ray()


def test_replicas_need_the_m2flow_engine():
    with pytest.raises(ConfigError, match="rollout.replicas=2 needs rollout.backend=m2flow"):
        load_config(None, ["rollout.replicas=2", "rollout.backend=hf"])
    with pytest.raises(ConfigError, match="rollout.replicas must be"):
        load_config(None, ["rollout.replicas=0"])

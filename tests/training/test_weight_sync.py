"""Weight sync (issue 14): the trainer's weights as size-bounded buckets (train.weight_sync_bucket_mb), loaded
into an engine bucket by bucket; the weight version each sample was generated with, carried through RolloutBatch
and logged as rollout/policy_version and rollout/staleness. (2 FSDP2 ranks give the one-rank buckets:
tests/training/test_training_data_parallel.py; the sync through Ray in a run: tests/e2e/test_e2e_grpo.py.)"""

from __future__ import annotations

import pytest
import torch

from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, ConfigError, TrainConfig, load_config
from m2flow.rollout import Engine, HFEngine, SamplingParams
from m2flow.rollout.types import Sample
from m2flow.training.weight_sync import MB, buckets, full_weights

KB = 1 / 1024  # of a MiB


def _actor(model, fsdp: bool = True):
    from m2flow.training.actor import Actor

    return Actor(model, TrainConfig(fsdp=fsdp), AlgorithmConfig())


def _names(parts: list[dict]) -> list[list[str]]:
    return [list(p) for p in parts]


# ---- bucketing ------------------------------------------------------------------------------------------


def test_buckets_close_when_the_next_weight_would_not_fit():
    w = {"a": torch.zeros(10), "b": torch.zeros(20), "c": torch.zeros(100),  # 40, 80, 400 bytes (float32)
         "d": torch.zeros(5), "e": torch.zeros(60, dtype=torch.bfloat16)}  # 20, 120 bytes
    assert _names(list(buckets(w.items(), 128))) == [["a", "b"], ["c"], ["d"], ["e"]]  # 120 | 400 alone | 20+120>128
    assert _names(list(buckets(w.items(), 140))) == [["a", "b"], ["c"], ["d", "e"]]  # at most: 20+120 = 140 fits
    assert _names(list(buckets(w.items(), 1))) == [[k] for k in w]  # every weight larger than the bucket: alone
    assert _names(list(buckets(w.items(), 10**9))) == [list(w)]
    assert list(buckets([], 128)) == []
    one = next(buckets(w.items(), 128))
    assert all(one[k] is w[k] for k in one)  # the tensors themselves, no copy

    read = []

    def stream():
        for k, v in w.items():
            read.append(k)
            yield k, v

    lazy = buckets(stream(), 128)
    next(lazy)
    assert read == ["a", "b", "c"]  # the first bucket comes out once c is known not to fit, before d is read


def test_trainer_buckets_are_the_full_weights_in_order(make_micro_model):
    actor = _actor(make_micro_model(1))  # FSDP2 on one rank: every weight a DTensor
    whole = actor.state_dict()
    assert actor.hf_config.tie_word_embeddings and "lm_head.weight" in whole
    limit = 8 * KB
    parts = list(actor.weight_buckets(limit))
    names = [n for p in parts for n in p]
    # every weight exactly once, in state_dict order; the tied head is the embedding and is not sent twice
    assert names == [n for n in whole if n != "lm_head.weight"]
    for p in parts:
        assert len(p) == 1 or sum(t.numel() * t.element_size() for t in p.values()) <= limit * MB
    embed = parts[0]["model.embed_tokens.weight"]
    assert len(parts[0]) == 1 and embed.numel() * 4 > limit * MB  # 261 x 32 floats: alone in the first bucket
    assert 2 < len(parts) < len(names)
    merged = {n: t for p in parts for n, t in p.items()}
    assert all(torch.equal(merged[n], whole[n]) for n in merged)
    assert _names(list(actor.weight_buckets(limit))) == _names(parts)  # deterministic
    embed.zero_()  # copies, not views of the parameters
    assert torch.equal(actor.state_dict()["model.embed_tokens.weight"], whole["model.embed_tokens.weight"])


def test_bucket_size_is_validated():
    assert load_config(None, []).train.weight_sync_bucket_mb == 256
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match="train.weight_sync_bucket_mb"):
            load_config(None, [f"train.weight_sync_bucket_mb={bad}"])


# ---- loading bucket by bucket ---------------------------------------------------------------------------


def test_loading_bucket_by_bucket_equals_loading_the_whole_dict(make_micro_model, tokenizer, chat_prompts):
    trained = make_micro_model(1)
    whole = {k: v.clone() for k, v in trained.state_dict().items()}
    actor = _actor(trained)
    engines = [Engine.from_model(make_micro_model(0), tokenizer) for _ in range(2)]
    engines[0].load_weights(whole, policy_version=3)
    engines[1].load_weights((nt for b in actor.weight_buckets(8 * KB) for nt in b.items()), policy_version=3)
    for (name, a), (_, b) in zip(engines[0].model.named_parameters(), engines[1].model.named_parameters()):
        assert torch.equal(a, b), name
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    prompts = chat_prompts(3)
    one, two = (e.generate(prompts, params) for e in engines)
    assert [(s.token_ids, s.logprobs) for s in one] == [(s.token_ids, s.logprobs) for s in two]
    assert {s.policy_version for s in two} == {3}
    fresh = Engine.from_model(make_micro_model(1), tokenizer).generate(prompts, params)  # they are model 1's
    assert [s.token_ids for s in fresh] == [s.token_ids for s in one]


def test_hf_engine_loads_a_stream_and_refuses_an_incomplete_one(make_micro_model, tokenizer, chat_prompts):
    other = make_micro_model(1)
    stream = lambda: (nt for b in buckets(full_weights(other), 8 * KB * MB) for nt in b.items())  # noqa: E731
    engine = HFEngine(make_micro_model(0), tokenizer)
    engine.load_weights(stream(), policy_version=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    want = HFEngine(other, tokenizer).generate(chat_prompts(2), params)
    got = engine.generate(chat_prompts(2), params)
    assert [s.token_ids for s in got] == [s.token_ids for s in want] and {s.policy_version for s in got} == {2}
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights(list(stream())[:-1], policy_version=3)
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights({"model.norm.weight": torch.zeros(3)}, policy_version=3)
    assert engine.policy_version == 2


# ---- policy version -------------------------------------------------------------------------------------


def _samples(versions: list[int], first_prompt: int = 0) -> list[Sample]:
    return [Sample(prompt_index=first_prompt + i // 2, prompt_ids=[5] * (2 + i), token_ids=[7] * (1 + i % 3),
                   logprobs=[-1.0] * (1 + i % 3), finish_reason="stop", policy_version=v)
            for i, v in enumerate(versions)]


def test_policy_version_is_carried_through_the_batch():
    a = RolloutBatch.from_samples(_samples([4, 4, 4, 4]), 0)
    b = RolloutBatch.from_samples(_samples([3, 3], first_prompt=2), 0)
    assert a.policy_version.tolist() == [4, 4, 4, 4] and a.policy_version.dtype == torch.long
    both = RolloutBatch.concat([a, b], 0)
    assert both.policy_version.tolist() == [4, 4, 4, 4, 3, 3]
    assert both.select(torch.tensor([5, 0])).policy_version.tolist() == [3, 4]
    assert [p.policy_version.tolist() for p in both.split(4)] == [[4, 4, 4, 4], [3, 3]]
    both.scores = torch.ones(6, dtype=torch.float64)
    moved = both.to(torch.device("cpu"))  # (the trainer moves each micro-batch to its device)
    assert moved.input_ids is both.input_ids and moved.advantages is None and moved.scores is both.scores
    meta = both.to("meta")
    assert all(getattr(meta, f).device.type == "meta" and getattr(meta, f).dtype == getattr(both, f).dtype
               for f in ("input_ids", "response_mask", "policy_version", "scores"))


def test_policy_version_and_staleness_metrics():
    from m2flow.stages import Round, batch_metrics, prepare_round

    cfg = load_config(None, [])
    rounds: list[Round] = []
    for r, versions in enumerate(([4, 4, 4, 4], [4, 4, 3, 4])):
        samples = _samples(versions)
        batch = RolloutBatch.from_samples(samples, 0)
        rounds.append(prepare_round(batch, samples, torch.tensor([1.0, 0.0, 1.0, 0.0]), cfg, group_offset=2 * r))
    on_policy = batch_metrics(rounds[:1], rounds[0].batch, cfg, step=5)  # weights synced after step 4: version 4
    assert on_policy["rollout/policy_version"] == 4 and on_policy["rollout/staleness"] == 0
    mixed = batch_metrics(rounds, rounds[0].batch, cfg, step=5)  # one sample from the weights of step 3
    assert mixed["rollout/policy_version"] == 3 and mixed["rollout/staleness"] == 1


def test_full_weights_load_into_a_plain_model(make_micro_model):
    """The inference group's weight load (load_full_weights): a stream's buckets make a model equal to the source,
    a tied weight loaded once; a name the model lacks is refused."""
    from m2flow.training.weight_sync import load_full_weights

    source, target = make_micro_model(seed=1), make_micro_model(seed=2)
    for bucket in buckets(full_weights(source), MB // 64):
        load_full_weights(target, bucket)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="model.nope.weight"):
        load_full_weights(target, {"model.nope.weight": torch.zeros(1)})

"""HFEngine (transformers generate) against the trainer-side forward, plus the RolloutBatch layout."""

from __future__ import annotations

import pytest
import torch

from m2flow.batch import RolloutBatch
from m2flow.rollout import HFEngine, Sample, SamplingParams
from m2flow.training.forward import position_ids_from_mask, response_logits, token_logprobs

STOP_RANGE = list(range(100, 140))  # ~15% of the byte vocab: forces early stops in a random-init model


@pytest.fixture(scope="module")
def model(make_micro_model):
    return make_micro_model(0)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return HFEngine(model, tokenizer)


@pytest.fixture(scope="module")
def prompts(chat_prompts, tokenizer):
    out = chat_prompts(4)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in out]
    assert len(set(lengths)) == len(lengths), "the prompts must differ in length to exercise left padding"
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _trainer_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
        return token_logprobs(logits, batch.input_ids[:, batch.prompt_width :], temperature)


# ---------------------------------------------------------------------------------------------------------
# (a) rollout logprobs == trainer logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_match_trainer_forward(engine, model, tokenizer, prompts, temperature):
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=12, seed=3, stop_token_ids=STOP_RANGE)
    samples = engine.generate(prompts, params)
    for s in samples:
        assert len(s.logprobs) == len(s.token_ids) >= 1
        assert all(lp <= 1e-6 for lp in s.logprobs)
    batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    # both paddings are really exercised: ragged prompts (left) and ragged responses (right)
    assert len({len(s.prompt_ids) for s in samples}) > 1
    if temperature > 0:
        assert len({len(s.token_ids) for s in samples}) > 1
    trainer = _trainer_logprobs(model, batch, temperature)
    mask = batch.response_mask.bool()
    assert torch.isfinite(trainer[mask]).all()
    torch.testing.assert_close(trainer[mask], batch.rollout_logprobs[mask], atol=1e-4, rtol=0)


def test_temperature_changes_logprobs(engine, model, tokenizer, prompts):
    """The returned logprobs are of the temperature-scaled distribution, not of the raw logits."""
    samples = engine.generate(prompts[:2], SamplingParams(temperature=0.7, max_new_tokens=6, seed=0))
    batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    mask = batch.response_mask.bool()
    raw = _trainer_logprobs(model, batch, 1.0)
    assert (raw[mask] - batch.rollout_logprobs[mask]).abs().max() > 1e-3


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# ---------------------------------------------------------------------------------------------------------
# (b) greedy


def _manual_greedy(model, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """Argmax of a full forward (no KV cache), one token at a time."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            ids.append(token)
            out.append(token)
            if token in stops:
                break
    return out


def test_greedy_is_deterministic_and_matches_manual_loop(engine, model, tokenizer, prompts):
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    first = engine.generate(prompts[:3], params)
    second = engine.generate(prompts[:3], params)
    assert [s.token_ids for s in first] == [s.token_ids for s in second]
    assert [s.logprobs for s in first] == [s.logprobs for s in second]
    # the n greedy samples of one prompt are the same
    for i in range(3):
        assert first[2 * i].token_ids == first[2 * i + 1].token_ids
    for i, prompt in enumerate(prompts[:3]):
        expected = _manual_greedy(model, _encode(tokenizer, prompt), 10, {tokenizer.eos_token_id})
        assert first[2 * i].token_ids == expected, f"prompt {i}"
    # greedy logprobs are those of the raw logits, and the greedy token is the most likely one
    for s in first:
        assert all(lp > -torch.log(torch.tensor(float(len(tokenizer)))).item() for lp in s.logprobs)


def test_greedy_does_not_depend_on_batching(model, tokenizer, prompts):
    """Left padding (batch of all prompts) and no padding (one prompt at a time) give the same tokens."""
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    together = HFEngine(model, tokenizer, batch_size=64).generate(prompts, params)
    alone = HFEngine(model, tokenizer, batch_size=1).generate(prompts, params)
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]
    for a, b in zip(together, alone):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# (c) seeds


def test_same_seed_same_samples_different_seed_different(engine, prompts):
    def run(seed):
        return engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=seed))

    a, b, c = run(11), run(11), run(12)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_seed_is_reproducible_across_chunks(model, tokenizer, prompts):
    """Several generate batches (batch_size < requests) are still reproducible by seed."""
    engine = HFEngine(model, tokenizer, batch_size=3)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=5)
    assert [s.token_ids for s in engine.generate(prompts, params)] == [
        s.token_ids for s in engine.generate(prompts, params)
    ]


# ---------------------------------------------------------------------------------------------------------
# (d) finish reasons


def _check_finish(samples: list[Sample], stops: set[int], max_new_tokens: int) -> None:
    for s in samples:
        assert s.finish_reason in ("stop", "length")
        # no stop token before the last position
        assert not any(t in stops for t in s.token_ids[:-1])
        if s.finish_reason == "length":
            assert len(s.token_ids) == max_new_tokens
            assert s.token_ids[-1] not in stops
        else:
            assert 1 <= len(s.token_ids) <= max_new_tokens
            assert s.token_ids[-1] in stops


def test_finish_reason_with_extra_stop_tokens(engine, tokenizer, prompts):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=0, stop_token_ids=STOP_RANGE)
    samples = engine.generate(prompts, params)
    _check_finish(samples, {tokenizer.eos_token_id, *STOP_RANGE}, 8)
    reasons = {s.finish_reason for s in samples}
    assert reasons == {"stop", "length"}
    # a row stopped early: the stop token is kept as the last token and has a logprob
    short = [s for s in samples if s.finish_reason == "stop" and len(s.token_ids) < 8]
    assert short and all(len(s.logprobs) == len(s.token_ids) for s in short)


def test_finish_reason_eos(engine, tokenizer, prompts):
    for seed in range(50):  # a random-init model emits EOS (1 of 261 tokens) now and then
        samples = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=24, seed=seed))
        _check_finish(samples, {tokenizer.eos_token_id}, 24)
        stopped = [s for s in samples if s.finish_reason == "stop"]
        if stopped:
            break
    assert stopped, "no EOS stop in 50 seeds"
    assert all(s.token_ids[-1] == tokenizer.eos_token_id for s in stopped)
    # the text drops the special EOS token
    for s in samples:
        assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True)
        assert "<|end|>" not in s.text


# ---------------------------------------------------------------------------------------------------------
# (e) n samples per prompt


@pytest.mark.parametrize("batch_size", [512, 5])
def test_n_samples_prompt_major(model, tokenizer, prompts, batch_size):
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    samples = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=1))
    assert len(samples) == 3 * len(prompts)
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(3)]
    for s in samples:
        assert s.prompt_ids == _encode(tokenizer, prompts[s.prompt_index])
        assert s.policy_version == 0
    # the samples of one prompt are independent draws
    for i in range(len(prompts)):
        group = [tuple(s.token_ids) for s in samples[3 * i : 3 * i + 3]]
        assert len(set(group)) > 1


def test_load_weights_updates_policy_and_version(make_micro_model, tokenizer, prompts):
    engine = HFEngine(make_micro_model(0), tokenizer)
    other = make_micro_model(1)
    state = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}  # tied: may appear once
    engine.load_weights(state, policy_version=7)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    got = engine.generate(prompts[:2], params)
    want = HFEngine(other, tokenizer).generate(prompts[:2], params)
    assert [s.token_ids for s in got] == [s.token_ids for s in want]
    assert all(s.policy_version == 7 for s in got)
    with pytest.raises(ValueError, match="does not match"):
        engine.load_weights({"not.a.weight": torch.zeros(1)}, policy_version=8)


# ---------------------------------------------------------------------------------------------------------
# (f) RolloutBatch layout


def _hand_samples() -> list[Sample]:
    return [
        Sample(prompt_index=0, prompt_ids=[5, 6], token_ids=[7, 8, 9], logprobs=[-0.1, -0.2, -0.3], finish_reason="length"),
        Sample(prompt_index=0, prompt_ids=[5, 6], token_ids=[10], logprobs=[-0.4], finish_reason="stop"),
        Sample(prompt_index=1, prompt_ids=[11, 12, 13, 14], token_ids=[15, 16], logprobs=[-0.5, -0.6], finish_reason="stop"),
    ]


def test_rollout_batch_layout():
    pad = 0
    batch = RolloutBatch.from_samples(_hand_samples(), pad_token_id=pad)
    assert len(batch) == 3 and batch.prompt_width == 4
    assert batch.response_mask.shape == (3, 3)
    assert batch.input_ids.tolist() == [
        [0, 0, 5, 6, 7, 8, 9],
        [0, 0, 5, 6, 10, 0, 0],
        [11, 12, 13, 14, 15, 16, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [0, 0, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    torch.testing.assert_close(
        batch.rollout_logprobs, torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0, 0], [-0.5, -0.6, 0]])
    )
    assert batch.group_ids.tolist() == [0, 0, 1]
    assert batch.input_ids.dtype == torch.long and batch.response_mask.dtype == torch.float32
    assert batch.scores is None and batch.advantages is None and batch.old_logprobs is None


def test_rollout_batch_empty_responses():
    s = Sample(prompt_index=0, prompt_ids=[3, 4], token_ids=[], logprobs=[], finish_reason="length")
    batch = RolloutBatch.from_samples([s], pad_token_id=0)
    assert batch.response_mask.shape == (1, 1) and batch.response_mask.sum() == 0
    assert batch.input_ids.tolist() == [[3, 4, 0]] and batch.attention_mask.tolist() == [[1, 1, 0]]


def test_rollout_batch_select_and_split():
    samples = _hand_samples() * 2
    batch = RolloutBatch.from_samples(samples, pad_token_id=0)
    batch.scores = torch.arange(6, dtype=torch.float32)
    picked = batch.select(torch.tensor([4, 0]))
    assert len(picked) == 2
    assert torch.equal(picked.input_ids, batch.input_ids[[4, 0]])
    assert torch.equal(picked.response_mask, batch.response_mask[[4, 0]])
    assert picked.scores.tolist() == [4.0, 0.0]
    assert picked.advantages is None  # None fields stay None
    assert batch.select(slice(1, 3)).group_ids.tolist() == [0, 1]
    parts = batch.split(4)
    assert [len(p) for p in parts] == [4, 2]
    for name in ("input_ids", "attention_mask", "response_mask", "rollout_logprobs", "group_ids", "scores"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(batch, name)), name
    assert all(p.prompt_width == batch.prompt_width for p in parts)

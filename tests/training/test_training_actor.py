"""Actor: logprobs, one GRPO update, FSDP2 == plain, gradient accumulation == one big micro-batch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

from m2flow.algorithms import grpo_advantages
from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, TrainConfig
from m2flow.rollout import HFEngine, SamplingParams
from m2flow.training.actor import Actor
from m2flow.training.forward import response_logits, token_logprobs

LR = 1e-3  # Adam moves every weight by about lr on the first step: large against the 1e-5 tolerances


@pytest.fixture(scope="module")
def base_model(make_micro_model):
    return make_micro_model(0)


@pytest.fixture(scope="module")
def rollout(base_model, tokenizer, chat_prompts):
    """12 samples (3 prompts x 4), ragged prompts and responses, with scores and GRPO advantages."""
    engine = HFEngine(copy.deepcopy(base_model), tokenizer)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=1, stop_token_ids=list(range(100, 130)))
    samples = engine.generate(chat_prompts(3), params)
    batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    assert len({len(s.token_ids) for s in samples}) > 1  # ragged responses: token weighting matters
    batch.scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    batch.advantages = grpo_advantages(batch.scores, batch.group_ids)
    assert (batch.advantages != 0).all()
    return batch


def _actor(model, **train) -> Actor:
    train = {"fsdp": False, "lr": LR, "max_tokens_per_microbatch": 0, **train}  # padded micro-batches unless asked
    return Actor(model, TrainConfig(**train), AlgorithmConfig())


def _prepared(actor: Actor, batch: RolloutBatch) -> RolloutBatch:
    batch = copy.deepcopy(batch)
    batch.old_logprobs = actor.compute_logprobs(batch)
    return batch


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _grads(actor: Actor) -> dict[str, torch.Tensor]:
    """The last optimizer step's (clipped) gradients, unsharded."""
    out = {}
    for name, p in actor.model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def test_compute_logprobs_matches_forward_helpers(base_model, rollout):
    model = copy.deepcopy(base_model)
    actor = _actor(model, micro_batch_size=5)  # several micro-batches, last one partial
    got = actor.compute_logprobs(rollout)
    assert got.shape == rollout.response_mask.shape
    with torch.no_grad():
        logits = response_logits(model, rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1])
        want = token_logprobs(logits, rollout.input_ids[:, rollout.prompt_width :])
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert (got[~mask] == 0).all()
    # and with the behaviour logprobs of the engine (same weights, temperature 1)
    torch.testing.assert_close(got[mask], rollout.rollout_logprobs[mask], atol=1e-4, rtol=0)


def test_compute_logprobs_uses_temperature(base_model, rollout):
    plain = _actor(copy.deepcopy(base_model)).compute_logprobs(rollout)
    actor = Actor(copy.deepcopy(base_model), TrainConfig(fsdp=False), AlgorithmConfig(), temperature=0.5)
    scaled = actor.compute_logprobs(rollout)
    with torch.no_grad():
        logits = response_logits(base_model, rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1])
        want = token_logprobs(logits, rollout.input_ids[:, rollout.prompt_width :], 0.5)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(scaled[mask], want[mask], atol=1e-5, rtol=0)
    assert (scaled[mask] - plain[mask]).abs().max() > 1e-3


def test_update_returns_finite_metrics_and_changes_weights(base_model, rollout):
    actor = _actor(copy.deepcopy(base_model))
    batch = _prepared(actor, rollout)
    before = actor.state_dict()
    metrics = actor.update(batch)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/lr"):
        assert key in metrics, key
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["actor/grad_norm"] > 0
    assert metrics["actor/entropy"] > 0
    assert metrics["actor/lr"] == pytest.approx(LR)
    # old_logprobs == current logprobs: ratio 1, nothing clipped, loss = -(token-mean advantage)
    assert metrics["actor/pg_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["actor/pg_clip_frac"] == 0.0
    mask = batch.response_mask
    expected_loss = -(batch.advantages[:, None] * mask).sum() / mask.sum()
    assert metrics["actor/pg_loss"] == pytest.approx(float(expected_loss), abs=1e-5)
    after = actor.state_dict()
    assert _max_diff(before, after) > LR / 2
    # the update raises the likelihood of positive-advantage samples relative to negative ones
    new = actor.compute_logprobs(batch)
    gain = ((new - batch.old_logprobs) * mask).sum(-1) / mask.sum(-1)
    assert gain[batch.advantages > 0].mean() > gain[batch.advantages < 0].mean()


def test_zero_advantages_leave_weights_unchanged(base_model, rollout):
    actor = _actor(copy.deepcopy(base_model))
    batch = _prepared(actor, rollout)
    batch.advantages = torch.zeros(len(batch))
    before = actor.state_dict()
    metrics = actor.update(batch)
    assert metrics["actor/grad_norm"] == 0.0
    assert metrics["actor/pg_loss"] == 0.0
    after = actor.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_a_batch_without_loss_tokens_updates_nothing(base_model, rollout):
    """Every response masked out of the loss (e.g. all truncated, with algorithm.overlong_filter): no loss
    token, no weight change, finite metrics."""
    actor = _actor(copy.deepcopy(base_model), max_tokens_per_microbatch=48)
    batch = _prepared(actor, rollout)
    batch.response_mask = torch.zeros_like(batch.response_mask)
    before = actor.state_dict()
    metrics = actor.update(batch)
    assert metrics["actor/pg_loss"] == 0.0 and metrics["actor/grad_norm"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    after = actor.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fsdp", [False, True])
def test_sequences_with_zero_advantage_are_skipped_with_the_same_update(base_model, rollout, fsdp):
    """A group whose rewards are all equal (algorithm.filter_groups=false keeps it) has advantage 0: the update
    skips its rows, and the gradient and weights are those of computing them (their tokens still count in the
    token-mean's normaliser)."""
    batch = copy.deepcopy(rollout)
    batch.scores[:4] = 1.0  # group 0 all right: advantage 0
    batch.advantages = grpo_advantages(batch.scores, batch.group_ids)
    assert (batch.advantages[:4] == 0).all() and (batch.advantages[4:] != 0).all()
    skipping = _actor(copy.deepcopy(base_model), fsdp=fsdp, max_tokens_per_microbatch=48)
    computing = _actor(copy.deepcopy(base_model), fsdp=fsdp, max_tokens_per_microbatch=48)
    computing.skip_zero_advantage = False
    assert skipping.skip_zero_advantage
    prepared = _prepared(skipping, batch)
    assert sorted(i for rows, _ in skipping._micro_batches(prepared) for i in rows.tolist()) == list(range(4, 12))
    m_skip, m_all = skipping.update(copy.deepcopy(prepared)), computing.update(copy.deepcopy(prepared))
    assert _max_diff(_grads(skipping), _grads(computing)) < 1e-6
    assert _max_diff(skipping.state_dict(), computing.state_dict()) < 1e-6
    assert m_skip["actor/grad_norm"] == pytest.approx(m_all["actor/grad_norm"], rel=1e-5)
    # the metrics average over the rows that train
    assert m_skip["actor/pg_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    mask = prepared.response_mask[4:]
    expected = -(prepared.advantages[4:, None] * mask).sum() / mask.sum()
    assert m_skip["actor/pg_loss"] == pytest.approx(float(expected), abs=1e-5)


def test_nothing_is_skipped_with_a_kl_or_entropy_term(base_model):
    for algo in (AlgorithmConfig(kl_coef=0.1), AlgorithmConfig(entropy_coef=0.01)):
        assert not Actor(copy.deepcopy(base_model), TrainConfig(fsdp=False), algo).skip_zero_advantage


@pytest.mark.parametrize("micro_batch_size", [1, 5])
def test_gradient_accumulation_matches_one_micro_batch(base_model, rollout, micro_batch_size):
    big = _actor(copy.deepcopy(base_model), micro_batch_size=len(rollout))
    small = _actor(copy.deepcopy(base_model), micro_batch_size=micro_batch_size)
    mb_big, mb_small = big.update(_prepared(big, rollout)), small.update(_prepared(small, rollout))
    assert _max_diff(_grads(big), _grads(small)) < 1e-6
    assert _max_diff(big.state_dict(), small.state_dict()) < 1e-5
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm"):
        assert mb_big[key] == pytest.approx(mb_small[key], abs=1e-5), key


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_gradient_accumulation_sequence_mean_aggregations(base_model, rollout, loss_agg):
    def run(mbs):
        actor = Actor(copy.deepcopy(base_model), TrainConfig(fsdp=False, lr=LR, micro_batch_size=mbs, max_tokens_per_microbatch=0),
                      AlgorithmConfig(loss_agg=loss_agg))
        actor.update(_prepared(actor, rollout))
        return _grads(actor)

    assert _max_diff(run(len(rollout)), run(5)) < 1e-6


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_streamed_micro_batches_give_the_whole_batch_update(base_model, rollout, loss_agg):
    """A pipelined placement's update: the rows arrive in pieces, in another order (accumulate), and the optimizer
    steps once (optimizer_step); the same gradients, weights and metrics as `update` on the whole batch."""
    def actor():
        return Actor(copy.deepcopy(base_model), TrainConfig(fsdp=False, lr=LR, max_tokens_per_microbatch=0),
                     AlgorithmConfig(loss_agg=loss_agg))

    whole, streamed = actor(), actor()
    batch = _prepared(whole, rollout)
    want = whole.update(batch)
    for rows in ([8, 9, 10, 11], [0, 1, 2, 3, 4], [7, 5, 6]):  # groups out of order, one split across pieces
        streamed.accumulate(batch.select(torch.tensor(rows)))
    step = streamed.optimizer_step()
    got = streamed.streamed_update_metrics()
    assert step["skipped_steps"] == 0.0 and streamed.streamed_update_metrics()["actor/skipped_steps"] == 0
    assert _max_diff(_grads(whole), _grads(streamed)) < 1e-6
    assert _max_diff(whole.state_dict(), streamed.state_dict()) < 1e-6
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/lr"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # a metric that is a token mean per micro-batch, averaged by the loss's weights (sequences with a seq-mean
    # loss), depends a little on how the rows were grouped
    assert got["actor/entropy"] == pytest.approx(want["actor/entropy"], rel=1e-4)


def test_mini_batches_and_epochs_take_several_steps(base_model, rollout):
    actor = _actor(copy.deepcopy(base_model), mini_batches=2, epochs=2, micro_batch_size=4)
    metrics = actor.update(_prepared(actor, rollout))
    assert actor.optimizer.state[next(iter(actor.model.parameters()))]["step"] == 4
    assert all(math.isfinite(v) for v in metrics.values())


def test_fsdp_matches_plain_update(base_model, rollout):
    created = not dist.is_initialized()  # Actor(fsdp=True) starts a one-rank gloo group if there is none
    try:
        sharded = _actor(copy.deepcopy(base_model), fsdp=True, micro_batch_size=5)
        assert dist.is_initialized() and dist.get_world_size() == 1
        plain = _actor(copy.deepcopy(base_model), fsdp=False, micro_batch_size=5)
        batch_s, batch_p = _prepared(sharded, rollout), _prepared(plain, rollout)
        torch.testing.assert_close(batch_s.old_logprobs, batch_p.old_logprobs, atol=1e-6, rtol=0)
        # clone: on one rank the gathered full state dict aliases the live parameters (the plain path copies)
        start = {k: v.clone() for k, v in sharded.state_dict().items()}
        assert _max_diff(start, base_model.state_dict()) == 0.0  # full_state_dict gathers the shards
        m_s, m_p = sharded.update(batch_s), plain.update(batch_p)
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
            assert m_s[key] == pytest.approx(m_p[key], abs=1e-5), key
        assert _max_diff(_grads(sharded), _grads(plain)) < 1e-6
        after_s, after_p = sharded.state_dict(), plain.state_dict()
        assert all(not hasattr(v, "full_tensor") for v in after_s.values())  # plain tensors, HF names
        assert set(after_s) == set(base_model.state_dict())
        assert _max_diff(after_s, after_p) < 1e-5
        assert _max_diff(after_s, start) > LR / 2
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    assert dist.is_initialized() != created  # no process group leaks into later tests


def test_kl_term_and_reference_worker(base_model, rollout, tokenizer, tmp_path):
    """The reference (a frozen copy of the start) gives the actor's own logprobs; with kl_coef > 0 the
    actor reports the KL, which is exactly 0 before the first update and positive after it."""
    from m2flow.config import Config
    from m2flow.scheduler.workers import ReferenceWorker, Start
    from m2flow.training.checkpoint import save_hf_checkpoint

    save_hf_checkpoint(str(tmp_path / "ref"), base_model.config, base_model.state_dict(), tokenizer)
    cfg = Config()
    cfg.rollout.temperature = 1.0
    reference = ReferenceWorker(Start.of(str(tmp_path / "ref"), cfg), cfg.train, cfg.rollout.temperature, threads=1)
    actor = Actor(copy.deepcopy(base_model), TrainConfig(fsdp=False, lr=LR),
                  AlgorithmConfig(kl_coef=0.5, kl_estimator="k3"))
    batch = _prepared(actor, rollout)
    batch.ref_logprobs = reference.compute_logprobs(batch)
    torch.testing.assert_close(batch.ref_logprobs, batch.old_logprobs, atol=1e-5, rtol=0)
    first = actor.update(batch)
    assert first["actor/kl"] == pytest.approx(0.0, abs=1e-6)
    second = actor.update(batch)
    assert second["actor/kl"] > 0


def _saved_bytes(actor: Actor, mb: RolloutBatch) -> int:
    """Bytes of the tensors autograd keeps for backward in one micro-batch's loss (shared storages once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    actor.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        actor._micro_batch_loss(mb)
    return sum(storages.values())


@pytest.mark.parametrize("packed", [0, 48])
def test_activation_checkpointing_keeps_less_for_the_same_gradients(base_model, rollout, packed):
    """train.activation_checkpointing: each decoder layer keeps only its input; backward recomputes the rest,
    so the gradients and the update are the same while far fewer bytes are held between forward and backward."""
    plain = _actor(copy.deepcopy(base_model), max_tokens_per_microbatch=packed)
    recomputing = _actor(copy.deepcopy(base_model), max_tokens_per_microbatch=packed, activation_checkpointing=True)
    prepared = _prepared(plain, rollout)
    mb = recomputing._micro_batches(prepared)[0][1]
    assert _saved_bytes(recomputing, mb) < 0.6 * _saved_bytes(plain, mb)
    m_plain, m_recomputing = plain.update(copy.deepcopy(prepared)), recomputing.update(copy.deepcopy(prepared))
    assert _max_diff(_grads(plain), _grads(recomputing)) < 1e-6
    assert _max_diff(plain.state_dict(), recomputing.state_dict()) < 1e-6
    assert m_recomputing["actor/grad_norm"] == pytest.approx(m_plain["actor/grad_norm"], rel=1e-6)


def test_offload_gives_the_same_update(base_model, rollout):
    """train.offload (FSDP2 CPUOffloadPolicy): on a GPU the shards and the optimizer state live in host memory; on
    CPU devices the same code path runs and the update is the one without it."""
    from m2flow.config import ConfigError, load_config

    created = not dist.is_initialized()
    try:
        offloaded = _actor(copy.deepcopy(base_model), fsdp=True, offload=True, micro_batch_size=5)
        sharded = _actor(copy.deepcopy(base_model), fsdp=True, micro_batch_size=5)
        m_off, m_on = offloaded.update(_prepared(offloaded, rollout)), sharded.update(_prepared(sharded, rollout))
        assert m_off["actor/grad_norm"] == pytest.approx(m_on["actor/grad_norm"], rel=1e-6)
        assert _max_diff(offloaded.state_dict(), sharded.state_dict()) < 1e-6
        assert all(p.device.type == "cpu" for p in offloaded.model.parameters())
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    with pytest.raises(ConfigError, match="train.offload needs train.fsdp=true"):
        load_config(None, ["train.offload=true", "train.fsdp=false"])


def test_mixed_precision_keeps_float32_master_weights(base_model, rollout):
    """param_dtype=bfloat16 (what a GPU rank uses for a bfloat16 policy): FSDP2 computes each layer in bfloat16
    over float32 master weights, so the parameters and the optimizer stay float32, the logprobs carry bfloat16
    rounding, and the update follows the float32 one."""
    created = not dist.is_initialized()
    try:
        full = _actor(copy.deepcopy(base_model), fsdp=True, max_tokens_per_microbatch=48)
        mixed = Actor(copy.deepcopy(base_model), TrainConfig(fsdp=True, lr=LR, max_tokens_per_microbatch=48),
                      AlgorithmConfig(), param_dtype=torch.bfloat16)
        b_full, b_mixed = _prepared(full, rollout), _prepared(mixed, rollout)
        gap = (b_full.old_logprobs - b_mixed.old_logprobs).abs().max().item()
        assert 0 < gap < 0.05  # computed in bfloat16: close, not equal
        m_full, m_mixed = full.update(b_full), mixed.update(b_mixed)
        assert m_mixed["actor/grad_norm"] == pytest.approx(m_full["actor/grad_norm"], rel=0.02)
        assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}
        assert {s["exp_avg"].dtype for s in mixed.optimizer.state.values()} == {torch.float32}
        moved = _max_diff(mixed.state_dict(), base_model.state_dict())
        assert LR / 2 < moved < 3 * LR  # Adam's first step: about lr per weight
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()

"""The trainer on 2 ranks (issue 14): FSDP2 over a 2-rank gloo group, each rank training on its token-balanced
part of every mini-batch, gives the one-rank trainer's logprobs, metrics and updated weights (to float
rounding), packed or padded, with ranks that run different numbers of micro-batches. So do the critic (values,
update) and the frozen reference (logprobs, and weights loaded into it as an inference group's are) on 2 ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m2flow.algorithms import grpo_advantages
from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, TrainConfig
from m2flow.rollout.types import Sample
from m2flow.training.data_parallel import balanced_split


def _batch() -> RolloutBatch:
    """12 samples (3 prompts x 4), ragged prompts and responses, GRPO advantages."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(12):
        p, t = int(torch.randint(3, 11, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        samples.append(Sample(prompt_index=i // 4, prompt_ids=torch.randint(3, 200, (p,), generator=g).tolist(),
                              token_ids=torch.randint(3, 200, (t,), generator=g).tolist(), logprobs=[-1.0] * t,
                              finish_reason="stop"))
    batch = RolloutBatch.from_samples(samples, 0)
    batch.scores = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1])
    batch.advantages = grpo_advantages(batch.scores, batch.group_ids)
    return batch


def _train(fsdp: bool, **train) -> dict:
    from m2flow.data.tokenizer import build_tokenizer
    from m2flow.models.tiny import make_tiny_model, tiny_qwen2_config
    from m2flow.training.actor import Actor

    tok = build_tokenizer()
    config = tiny_qwen2_config(len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    actor = Actor(make_tiny_model(config, seed=0), TrainConfig(fsdp=fsdp, lr=1e-3, mini_batches=2, **train),
                  AlgorithmConfig())
    batch = _batch()
    batch.old_logprobs = actor.compute_logprobs(batch)
    metrics = actor.update(batch)
    return {"weights": actor.state_dict(), "metrics": metrics, "logprobs": batch.old_logprobs,
            "buckets": list(actor.weight_buckets(8 / 1024))}  # the weight sync's, of at most 8 KiB


def _critic_and_reference(fsdp: bool, **train) -> dict:
    """The other two trainer groups' work: a frozen reference (the actor's starting weights) computes logprobs;
    a critic (the tiny transformer with a seeded random value head) computes values and takes one update (2
    optimizer steps) on their GAE returns."""
    from transformers import Qwen2ForTokenClassification

    from m2flow.algorithms import gae_advantages, scores_to_token_rewards
    from m2flow.config import CriticConfig
    from m2flow.data.tokenizer import build_tokenizer
    from m2flow.models.tiny import make_tiny_model, tiny_qwen2_config
    from m2flow.training.critic import Critic
    from m2flow.training.reference import Reference

    tok = build_tokenizer()
    config = tiny_qwen2_config(len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    reference = Reference(make_tiny_model(config, seed=0), TrainConfig(fsdp=fsdp, **train), temperature=1.0)
    batch = _batch()
    logprobs = reference.compute_logprobs(batch)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in reference.model.parameters())
    # an inference group's weight sync: another model's weights, bucket by bucket, into the (sharded) reference
    from m2flow.training.weight_sync import buckets, full_weights, load_full_weights

    for bucket in buckets(full_weights(make_tiny_model(config, seed=5)), 16 * 1024):
        load_full_weights(reference.model, bucket)
    synced_logprobs = reference.compute_logprobs(batch)
    config.num_labels, config.classifier_dropout = 1, 0.0
    torch.manual_seed(1)
    critic = Critic(Qwen2ForTokenClassification(config), TrainConfig(fsdp=fsdp, lr=1e-3, mini_batches=2, **train),
                    CriticConfig(lr=1e-3), AlgorithmConfig(advantage="gae"))
    batch.values = critic.compute_values(batch)
    batch.advantages, batch.returns = gae_advantages(scores_to_token_rewards(batch.scores, batch.response_mask),
                                                     batch.values, batch.response_mask)
    metrics = critic.update(batch)
    return {"ref_logprobs": logprobs, "ref_local_params": local, "synced_logprobs": synced_logprobs, "values": batch.values, "critic_metrics": metrics,
            "critic_weights": critic.state_dict()}


def _rank_main(rank: int, world_size: int, store: str, out: str, train: dict) -> None:
    from m2flow.training.actor import init_trainer_group

    torch.set_num_threads(1)
    init_trainer_group(rank, world_size, store)
    result = _train(True, **train)  # every rank takes part in the collectives, rank 0 holds the full weights
    result["others"] = _critic_and_reference(True, **train)  # (in the runner, each has a group of its own)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()  # both ranks done with every collective before the group is torn down
    dist.destroy_process_group()


def test_balanced_split_is_by_tokens():
    parts = balanced_split([10, 1, 1, 1, 9, 2], 2)
    # longest first onto the least loaded rank (ties to rank 0): 10, 9, 2 -> rank 1, then the 1s: 12 and 12 tokens
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5]]
    assert [p.tolist() for p in balanced_split([5], 2)] == [[0], []]  # a rank may get nothing


@pytest.fixture(scope="module", params=[{"max_tokens_per_microbatch": 0, "micro_batch_size": 2},
                                        {"max_tokens_per_microbatch": 24}], ids=["padded", "packed"])
def ranks_results(request, tmp_path_factory):
    """(the 2-rank results, the 1-rank ones, the train settings): one spawn of 2 ranks does the actor's work, then
    the critic's and the reference's."""
    train, tmp = request.param, tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(2, str(tmp / "store"), str(tmp / "out.pt"), train), nprocs=2, join=True)
    one = _train(False, **train)
    one["others"] = _critic_and_reference(False, **train)
    return torch.load(tmp / "out.pt", weights_only=False), one, train


def test_two_ranks_equal_one(ranks_results):
    two, one, _ = ranks_results
    assert (two["logprobs"] - one["logprobs"]).abs().max() < 1e-5
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key
    # Adam moves every weight by about lr = 1e-3: the two agree to 1% of one step
    assert max((two["weights"][k] - one["weights"][k]).abs().max().item() for k in one["weights"]) < 1e-5
    # the weight sync's buckets, gathered weight by weight on both ranks: rank 0's are its full weights, split as
    # on one rank (tests/training/test_weight_sync.py)
    assert [list(b) for b in two["buckets"]] == [list(b) for b in one["buckets"]]
    assert all(torch.equal(t, two["weights"][k]) for b in two["buckets"] for k, t in b.items())


def test_two_rank_critic_and_reference_equal_one(ranks_results):
    """The critic FSDP2-sharded over 2 ranks: every rank returns all the values (each computed its share), and its
    data-parallel update gives the 1-rank critic's metrics and weights. The frozen reference sharded over 2 ranks
    (each holds about half the weights) gives the 1-rank logprobs."""
    two, one = ranks_results[0]["others"], ranks_results[1]["others"]
    assert (two["ref_logprobs"] - one["ref_logprobs"]).abs().max() < 1e-5
    assert (one["ref_logprobs"] != 0).sum() == _batch().response_mask.sum()  # real logprobs on every response token
    assert 0.45 < two["ref_local_params"] / one["ref_local_params"] < 0.55
    # weights loaded whole into the sharded model (each rank takes its shards) give the plain model's logprobs
    assert (two["synced_logprobs"] - one["synced_logprobs"]).abs().max() < 1e-5
    assert (one["synced_logprobs"] - one["ref_logprobs"]).abs().max() > 1e-2  # (they are other weights)
    mask = _batch().response_mask.bool()
    assert (one["values"][mask] != 0).all() and (one["values"][~mask] == 0).all()
    assert (two["values"] - one["values"]).abs().max() < 1e-5
    # (not critic/vf_explained_var: a ratio of variances per micro-batch, it depends on how rows are grouped)
    for key in ("critic/value_loss", "critic/grad_norm"):
        assert two["critic_metrics"][key] == pytest.approx(one["critic_metrics"][key], rel=1e-4, abs=1e-6), key
    assert one["critic_metrics"]["critic/value_loss"] > 0
    # Adam moves every weight by about lr = 1e-3: the two agree to 1% of one step
    w2, w1 = two["critic_weights"], one["critic_weights"]
    assert set(w2) == set(w1) and max((w2[k] - w1[k]).abs().max().item() for k in w1) < 1e-5


def test_ranks_run_the_same_number_of_passes():
    """5 rows over 2 ranks, one row per micro-batch: the rank with 2 rows runs a third, dummy pass."""
    from m2flow.training.data_parallel import rank_micro_batches
    from m2flow.training.packing import micro_batches

    mini = _batch().select(torch.arange(5))
    passes = [rank_micro_batches(mini, lambda b: micro_batches(b, 1), r, 2) for r in (0, 1)]
    assert [len(p) for p in passes] == [3, 3]
    assert sorted(sum(real for _, _, real in p) for p in passes) == [2, 3]
    assert [real for _, _, real in min(passes, key=lambda p: sum(r for _, _, r in p))] == [True, True, False]
    rows = sorted(int(r) for p in passes for rows, _, real in p if real for r in rows)
    assert rows == [0, 1, 2, 3, 4]  # every row once, on one rank


def _actor(fsdp: bool, **train):
    from m2flow.data.tokenizer import build_tokenizer
    from m2flow.models.tiny import make_tiny_model, tiny_qwen2_config
    from m2flow.training.actor import Actor

    tok = build_tokenizer()
    config = tiny_qwen2_config(len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Actor(make_tiny_model(config, seed=0), TrainConfig(fsdp=fsdp, lr=1e-3, mini_batches=2, **train),
                 AlgorithmConfig())


def _step(actor) -> None:
    batch = _batch()
    batch.old_logprobs = actor.compute_logprobs(batch)
    actor.update(batch)


RESUME = {"max_tokens_per_microbatch": 24, "warmup_steps": 3}  # mid-warm-up at the save: the schedule must carry


def _resume_rank_main(rank: int, world_size: int, store: str, checkpoint: str, out: str, save: bool) -> None:
    """Two ranks either take the first step and save (each writing its shards) or load and take the second."""
    from m2flow.training.actor import init_trainer_group
    from m2flow.training.checkpoint import load_trainer, save_trainer

    torch.set_num_threads(1)
    init_trainer_group(rank, world_size, store)
    actor = _actor(True, **RESUME)
    if save:
        _step(actor)
        save_trainer(checkpoint, actor)
    else:
        load_trainer(checkpoint, actor)
        _step(actor)
        weights = actor.state_dict()
        if rank == 0:
            torch.save(weights, out)
    dist.barrier()
    dist.destroy_process_group()


def test_a_trainer_resumes_on_another_number_of_ranks(tmp_path):
    """Checkpoints hold the weights and AdamW state as shards (torch.distributed.checkpoint): saved by 2 ranks they
    load into 1, and saved by 1 into 2; either way the next step gives the never-stopped trainer's weights."""
    from m2flow.training.checkpoint import SHARDED, load_trainer, save_trainer

    straight = _actor(False, **RESUME)
    _step(straight)
    _step(straight)
    expected = straight.state_dict()

    two_saved = str(tmp_path / "saved-by-2")
    mp.spawn(_resume_rank_main, args=(2, str(tmp_path / "store-a"), two_saved, "", True), nprocs=2, join=True)
    assert len([f for f in os.listdir(os.path.join(two_saved, SHARDED)) if f.endswith(".distcp")]) == 2  # a file per rank
    one = _actor(False, **RESUME)
    load_trainer(two_saved, one)
    _step(one)

    one_saved = str(tmp_path / "saved-by-1")
    first = _actor(False, **RESUME)
    _step(first)
    save_trainer(one_saved, first)
    mp.spawn(_resume_rank_main, args=(2, str(tmp_path / "store-b"), one_saved, str(tmp_path / "out.pt"), False),
             nprocs=2, join=True)
    two = torch.load(tmp_path / "out.pt")

    fresh = _actor(False, **RESUME)  # the weights after step 1 but a new optimizer and schedule: this check can fail
    fresh.model.load_state_dict(first.state_dict())
    _step(fresh)
    diff = lambda w: max((w[k] - expected[k]).abs().max().item() for k in expected)  # noqa: E731
    assert diff(one.state_dict()) < 1e-5 and diff(two) < 1e-5
    assert diff(fresh.state_dict()) > 1e-4

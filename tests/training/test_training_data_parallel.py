"""The trainer on 2 ranks (issue 14): FSDP2 over a 2-rank gloo group, each rank training on its token-balanced
part of every mini-batch, gives the one-rank trainer's logprobs, metrics and updated weights (to float
rounding), packed or padded, with ranks that run different numbers of micro-batches."""

from __future__ import annotations

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
    return {"weights": actor.state_dict(), "metrics": metrics, "logprobs": batch.old_logprobs}


def _rank_main(rank: int, world_size: int, store: str, out: str, train: dict) -> None:
    from m2flow.training.actor import init_trainer_group

    torch.set_num_threads(1)
    init_trainer_group(rank, world_size, store)
    result = _train(True, **train)  # every rank takes part in the collectives, rank 0 holds the full weights
    if rank == 0:
        torch.save(result, out)
    dist.barrier()  # both ranks done with every collective before the group is torn down
    dist.destroy_process_group()


def test_balanced_split_is_by_tokens():
    parts = balanced_split([10, 1, 1, 1, 9, 2], 2)
    # longest first onto the least loaded rank (ties to rank 0): 10, 9, 2 -> rank 1, then the 1s: 12 and 12 tokens
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5]]
    assert [p.tolist() for p in balanced_split([5], 2)] == [[0], []]  # a rank may get nothing


@pytest.mark.parametrize("train", [{"max_tokens_per_microbatch": 0, "micro_batch_size": 2},
                                   {"max_tokens_per_microbatch": 24}], ids=["padded", "packed"])
def test_two_ranks_equal_one(tmp_path, train):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path / "out.pt"), train), nprocs=2, join=True)
    two = torch.load(tmp_path / "out.pt", weights_only=False)
    one = _train(False, **train)
    assert (two["logprobs"] - one["logprobs"]).abs().max() < 1e-5
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key
    # Adam moves every weight by about lr = 1e-3: the two agree to 1% of one step
    assert max((two["weights"][k] - one["weights"][k]).abs().max().item() for k in one["weights"]) < 1e-5


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

from __future__ import annotations

import pytest
import torch

from m2flow.batch import RolloutBatch
from m2flow.data.task import PromptSampler
from m2flow.stages import informative_rows


def _batch(scores, groups):
    B = len(scores)
    return RolloutBatch(
        input_ids=torch.zeros(B, 3, dtype=torch.long), attention_mask=torch.ones(B, 3, dtype=torch.long),
        response_mask=torch.ones(B, 2), rollout_logprobs=torch.zeros(B, 2),
        group_ids=torch.tensor(groups), scores=torch.tensor(scores, dtype=torch.float32),
    )


def test_informative_rows_drop_groups_with_equal_rewards():
    # group 0: all wrong, group 1: mixed, group 2: all right, group 3: mixed with a format penalty
    batch = _batch([0, 0, 1, 0, 1, 1, -0.5, 0], [0, 0, 1, 1, 2, 2, 3, 3])
    assert informative_rows(batch).tolist() == [2, 3, 6, 7]
    kept = batch.select(informative_rows(batch))
    assert kept.group_ids.tolist() == [1, 1, 3, 3]
    assert kept.input_ids.shape == (4, 3)


def test_informative_rows_none():
    assert informative_rows(_batch([1, 1], [0, 0])).numel() == 0


def test_prompt_sampler_epochs_are_permutations_and_seeded():
    a, b = PromptSampler(10, seed=3), PromptSampler(10, seed=3)
    first = a.next(4) + a.next(6)
    assert sorted(first) == list(range(10))  # one epoch covers every prompt once
    assert b.next(10) == first
    assert sorted(a.next(10)) == list(range(10))
    assert PromptSampler(10, seed=4).next(10) != first


def test_load_task_from_user_files(tmp_path):
    from m2flow.config import load_config
    from m2flow.data.datasets import DataError
    from m2flow.data.task import load_task

    (tmp_path / "train.jsonl").write_text('{"problem": "1+1?", "solution": 2}\n{"problem": "2+2?", "solution": "4"}\n')
    (tmp_path / "test.jsonl").write_text('{"problem": "3+3?", "solution": 6}\n')
    (tmp_path / "config.json").write_text("{}")  # model.path must look like an HF model directory
    (tmp_path / "tokenizer_config.json").write_text("{}")
    keys = ["data.prompt_key=problem", "data.answer_key=solution", f"data.train_path={tmp_path / 'train.jsonl'}",
            f"data.eval_path={tmp_path / 'test.jsonl'}", f"model.path={tmp_path}"]
    task = load_task(load_config(None, keys))
    assert [(p.question, p.answer) for p in task.train] == [("1+1?", "2"), ("2+2?", "4")]
    assert [(p.question, p.answer) for p in task.held_out] == [("3+3?", "6")]
    assert task.sft == []  # a user model needs no warm start

    (tmp_path / "test.jsonl").write_text('{"problem": "3+3?"}\n')
    with pytest.raises(DataError, match="test.jsonl:1"):
        load_task(load_config(None, keys))

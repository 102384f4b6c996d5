"""Bad data is found at start-up (issue 12): empty splits, malformed rows and prompts too long for the model
are errors naming `file:line`, or with data.bad_rows=skip are skipped and counted; never a hang or a crash mid-run."""

from __future__ import annotations

import json

import pytest

from m2flow.cli import main
from m2flow.config import load_config
from m2flow.data.datasets import BadRowError, DataError, load_problems
from m2flow.data.task import PromptSampler, drop_long_prompts, load_task
from m2flow.runner import run

GOOD = '{"question": "1+1?", "answer": 2}\n'


@pytest.fixture
def model_dir(tmp_path, tokenizer, micro_config):
    """An HF model directory holding only what the start-up checks read: config.json (max length 64) and the tokenizer."""
    path = tmp_path / "model"
    config = micro_config.to_dict() | {"max_position_embeddings": 64}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)
    return path


def test_empty_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"train.jsonl has no problems: it is empty"):
        load_problems(tmp_path / "train.jsonl")


def test_prompt_sampler_refuses_no_problems():
    with pytest.raises(ValueError, match="at least one problem"):
        PromptSampler(0, seed=0)


def test_malformed_rows_raise_or_are_skipped_with_file_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + '{"question": "2+2?", "answer": ""}\n' + "{not json\n" + '{"answer": 3}\n' + GOOD)
    with pytest.raises(BadRowError, match=r"train.jsonl:2: empty answer"):
        load_problems(path)
    skipped: list[str] = []
    problems = load_problems(path, skipped=skipped)
    assert [p.where for p in problems] == [f"{path}:1", f"{path}:5"]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "invalid JSON" in skipped[1] and "missing field 'question'" in skipped[2]
    path.write_text('{"question": "2+2?", "answer": ""}\n')
    with pytest.raises(DataError, match="all 1 rows are malformed"):
        load_problems(path, skipped=[])


def test_load_task_says_how_to_skip_and_counts_skipped_rows(tmp_path, model_dir):
    (tmp_path / "train.jsonl").write_text(GOOD + '{"question": " ", "answer": 1}\n')
    (tmp_path / "test.jsonl").write_text(GOOD)
    keys = [f"data.train_path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'test.jsonl'}",
            f"model.path={model_dir}"]
    with pytest.raises(DataError, match=r"train.jsonl:2: empty question.*data.bad_rows=skip"):
        load_task(load_config(None, keys))
    task = load_task(load_config(None, keys + ["data.bad_rows=skip"]))
    assert len(task.train) == 1 and len(task.skipped["train"]) == 1 and task.skipped["eval"] == []


def test_prompts_too_long_for_the_model(tmp_path, model_dir):
    long_question = "What is " + "1+" * 40 + "1?"  # ~90 tokens: over the 64-token max length
    (tmp_path / "train.jsonl").write_text(GOOD + json.dumps({"question": long_question, "answer": 41}) + "\n")
    (tmp_path / "test.jsonl").write_text(GOOD)
    keys = [f"data.train_path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'test.jsonl'}",
            f"model.path={model_dir}", "rollout.max_new_tokens=8", "eval.max_new_tokens=8"]
    cfg = load_config(None, keys)
    with pytest.raises(DataError, match=r"1 train prompt\(s\) too long.*train.jsonl:2: \d+ prompt tokens \+ "
                                        r"rollout.max_new_tokens=8 > 64.*data.bad_rows=skip"):
        drop_long_prompts(load_task(cfg), str(model_dir), cfg)
    cfg = load_config(None, keys + ["data.bad_rows=skip"])
    task = drop_long_prompts(load_task(cfg), str(model_dir), cfg)
    assert [p.answer for p in task.train] == ["2"] and len(task.held_out) == 1
    assert len(task.skipped["train"]) == 1 and "train.jsonl:2" in task.skipped["train"][0]


def test_empty_train_file_stops_run_before_anything_is_made(tmp_path, model_dir, capsys):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text(GOOD)
    out = tmp_path / "runs"
    keys = [f"data.train_path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'test.jsonl'}",
            f"model.path={model_dir}", f"output_dir={out}"]
    with pytest.raises(DataError, match="train.jsonl has no problems"):
        run(load_config(None, keys), progress=False)
    assert main(["train", *keys, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "m2flow: data error:" in err and "train.jsonl has no problems" in err
    assert not out.exists()

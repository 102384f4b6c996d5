"""`m2flow bench vs-trl`: the parts that need no TRL (reward wrapper, data files, batch layout, m2flow's config,
summaries, ratios and table on hand-made numbers, the message when TRL is missing), TRL's side on a micro model
(skipped without TRL), and both sides end to end (slow)."""

from __future__ import annotations

import json
import os

import pytest

from m2flow.bench import vs_trl
from m2flow.bench.vs_trl import (
    Settings,
    TRLMathReward,
    compare,
    differences,
    format_table,
    m2flow_overrides,
    prepare_data,
    side_summary,
    time_to_accuracy,
    trl_batch_layout,
    trl_config_kwargs,
)
from m2flow.config import load_config
from m2flow.data.datasets import load_problems
from m2flow.data.synthetic import make_splits
from m2flow.training.checkpoint import save_hf_checkpoint

NO_TRL = "TRL is not installed (an optional extra: pip install -e \".[bench]\"); CI installs only .[dev]"


def test_reward_wrapper_scores_like_math_reward_and_counts_tokens():
    reward = TRLMathReward()
    assert reward.__name__ == "math_reward"  # TRL names the reward's metrics after it
    completions = ["so 2 + 2 = 4, \\boxed{4}", "I think \\boxed{5}", "no answer here"]
    # TRL passes dataset columns (answer) and more (prompts, completion_ids, trainer_state, log_metric, ...)
    scores = reward(prompts=["p"] * 3, completions=completions, completion_ids=[[1, 2, 3], [4, 5], [6]],
                    answer=["4", "4", "4"], trainer_state=None, log_extra=print, log_metric=print)
    assert scores == [1.0, 0.0, 0.0]
    assert reward.calls == [{"completions": 3, "tokens": 6, "reward_mean": 1 / 3}]
    conversational = [[{"role": "assistant", "content": "\\boxed{7}"}]]
    assert reward(completions=conversational, answer=["7"]) == [1.0]
    assert TRLMathReward(format_penalty=0.5)(completions=["none"], answer=["1"]) == [-0.5]


def test_data_files_round_trip(tmp_path):
    splits = make_splits({"train": 6, "eval": 3}, seed=0)
    train_path, eval_path = prepare_data(splits["train"][:4], splits["eval"], str(tmp_path))
    assert os.path.basename(train_path) == "train.jsonl" and os.path.basename(eval_path) == "held_out.jsonl"
    train, held_out = load_problems(train_path), load_problems(eval_path)
    assert [(p.question, p.answer, p.meta) for p in train] == [(p.question, p.answer, p.meta)
                                                               for p in splits["train"][:4]]
    assert [p.answer for p in held_out] == [p.answer for p in splits["eval"]]
    assert all(p.solution is None for p in train)  # only questions and answers reach the trainers


@pytest.mark.parametrize("prompts,n,micro,per_device,accumulation", [
    (64, 8, 128, 128, 4),  # the demo: 512 completions, 4 slices of 128, one update
    (4, 2, 128, 8, 1),
    (3, 5, 4, 3, 5),  # 15 completions: the largest divisor up to 4 is 3
    (2, 2, 1, 1, 4),
])
def test_trl_batch_layout_is_one_generation_and_one_update_per_step(prompts, n, micro, per_device, accumulation):
    layout = trl_batch_layout(prompts, n, micro)
    assert layout == {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                      "steps_per_generation": accumulation, "num_iterations": 1}
    # generation_batch_size (completions) = per_device x 1 process x steps_per_generation = prompts x n
    assert layout["per_device_train_batch_size"] * layout["steps_per_generation"] == prompts * n


@pytest.fixture
def settings(tmp_path, make_micro_model, tokenizer):
    model = make_micro_model(0)
    model_path = save_hf_checkpoint(str(tmp_path / "model"), model.config, model.state_dict(), tokenizer)
    splits = make_splits({"train": 4, "eval": 4}, seed=0)
    train_path, eval_path = prepare_data(splits["train"], splits["eval"], str(tmp_path / "out"))
    return Settings(model_path=model_path, train_path=train_path, eval_path=eval_path, steps=2, prompts_per_step=2,
                    n=2, max_new_tokens=8, eval_max_new_tokens=8, lr=1e-3, eval_every=1, eval_problems=4, seed=3,
                    threads=1, micro_batch_size=128, progress=False)


def test_m2flow_side_config_has_the_shared_settings(settings, tmp_path):
    settings.m2flow_overrides = ["train.steps=99", "algorithm.filter_groups=false"]
    cfg = load_config(None, m2flow_overrides(settings, str(tmp_path / "runs")))
    assert (cfg.train.steps, cfg.train.prompts_per_step, cfg.rollout.n) == (2, 2, 2)  # shared settings win
    assert (cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens, cfg.train.lr) == (8, 8, 1e-3)
    assert (cfg.rollout.temperature, cfg.algorithm.kl_coef, cfg.eval.every, cfg.seed) == (1.0, 0.0, 1, 3)
    assert (cfg.model.path, cfg.data.train_path, cfg.eval.num_problems) == (settings.model_path,
                                                                            settings.train_path, 4)
    assert cfg.algorithm.filter_groups is False and cfg.checkpoint.every == 0 and cfg.cluster.num_cpus == 1
    assert not any("filter_groups=true" in d for d in differences(settings, cfg))
    default = load_config(None, m2flow_overrides(Settings(**{**settings.__dict__, "m2flow_overrides": []}),
                                                 str(tmp_path / "runs")))
    assert any("filter_groups=true" in d for d in differences(settings, default))
    trl = trl_config_kwargs(settings, "out")
    assert (trl["num_generations"], trl["max_completion_length"], trl["learning_rate"]) == (2, 8, 1e-3)
    assert trl["beta"] == 0.0
    assert (trl["lr_scheduler_type"], trl["temperature"], trl["max_steps"], trl["seed"]) == ("constant", 1.0, 2, 3)
    assert trl["gradient_checkpointing"] is False and trl["bf16"] is False


def _side(seconds, tokens, curve, tree_mb):
    return side_summary(seconds, tokens, curve, {"tree_peak_rss_mb": tree_mb, "maxrss_self_mb": tree_mb / 2,
                                                 "maxrss_children_mb": 0.0})


def test_summaries_ratios_and_table_from_hand_made_numbers():
    m = _side([3.0, 2.0, 2.0], [100, 200, 200], [(0, 0.1), (2, 0.2), (3, 0.3)], 3000.0)
    t = _side([5.0, 4.0, 4.0], [100, 200, 200], [(0, 0.1), (3, 0.2)], 1000.0)
    assert m["seconds_per_step"] == 2.0 and m["tokens_per_s"] == 100.0 and m["first_step_seconds"] == 3.0
    assert m["rl_seconds"] == 7.0 and [p["seconds"] for p in m["curve"]] == [0.0, 5.0, 7.0]
    assert t["seconds_per_step"] == 4.0 and t["tokens_per_s"] == 50.0 and t["rl_seconds"] == 13.0
    assert (m["accuracy_start"], m["accuracy_end"]) == (0.1, 0.3)
    assert time_to_accuracy(m["curve"], 0.2) == 5.0 and time_to_accuracy(m["curve"], 0.5) is None
    r = compare(m, t)
    assert r["seconds_per_step"] == 0.5 and r["speedup"] == 2.0 and r["tokens_per_s"] == 2.0
    assert r["rl_seconds"] == 7 / 13 and r["accuracy_end_points"] == pytest.approx(10.0)
    assert r["m2flow_seconds_to_trl_final_accuracy"] == 5.0 and r["time_to_trl_final_accuracy"] == 5 / 13
    assert r["tree_peak_rss"] == 3.0 and r["maxrss_self"] == 3.0
    result = {"m2flow": m, "trl": t, "ratios": r, "settings": {"steps": 3}, "differences": ["prompt order"]}
    table = format_table(result)
    assert "| seconds per step (mean of steps 2..3) | 2.00 | 4.00 | 0.50 (2.00x the step rate) |" in table
    assert "| generated tokens/s | 100 | 50 | 2.00 |" in table
    assert "| held-out greedy accuracy, step 3 | 30.0% | 20.0% | +10.0 points |" in table
    assert "| RL seconds to TRL's final accuracy | 5.0 s | 13.0 s | 0.38 |" in table
    assert "| peak RSS, process tree (sampled) | 3000 MB | 1000 MB | 3.00 |" in table
    assert "| 2 | 20.0% | 5.0 s | - | - |" in table and "| 3 | 30.0% | 7.0 s | 20.0% | 13.0 s |" in table
    assert table.endswith("not aligned:\n- prompt order")


def test_one_step_run_uses_its_only_step():
    s = side_summary([2.0], [50], [(0, 0.0), (1, 0.5)])
    assert s["seconds_per_step"] == 2.0 and s["tokens_per_s"] == 25.0 and s["curve"][-1]["seconds"] == 2.0


def test_cli_without_trl_says_how_to_install_it(monkeypatch, capsys):
    from m2flow.cli import main

    monkeypatch.setattr(vs_trl, "trl_available", lambda: False)
    assert main(["bench", "vs-trl", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[bench]"' in err
    assert main(["bench", "vs-trl", "--sides", "m2flow,verl"]) == 2


def test_trl_side_makes_one_generation_and_one_update_per_step(settings, tmp_path):
    pytest.importorskip("trl", reason=NO_TRL)
    config = vs_trl.trl_grpo_config(settings, str(tmp_path / "cfg"))
    assert not config.gradient_checkpointing and config.lr_scheduler_type == "constant"
    assert config.generation_batch_size == settings.prompts_per_step * settings.n
    assert config.steps_per_generation == config.gradient_accumulation_steps and config.num_iterations == 1

    result = vs_trl.run_trl_side(settings, str(tmp_path / "out"))
    assert len(result["step_seconds"]) == 2 and all(s > 0 for s in result["step_seconds"])
    assert all(0 < t <= settings.prompts_per_step * settings.n * settings.max_new_tokens
               for t in result["step_tokens"])
    assert [p["step"] for p in result["curve"]] == [0, 1, 2]  # the base and the weights saved at steps 1 and 2
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in result["curve"])
    assert os.path.isfile(os.path.join(tmp_path, "out", "trl", "step-2", "config.json"))
    assert result["memory"]["tree_peak_rss_mb"] > 0 and result["memory"]["maxrss_self_mb"] > 0
    assert result["special_tokens_added"] is False
    json.dumps(result)  # what the child process writes


@pytest.mark.slow
def test_both_sides_end_to_end(settings, tmp_path):
    pytest.importorskip("trl", reason=NO_TRL)
    out = os.path.dirname(settings.train_path)
    result = vs_trl.run_vs_trl(settings, out, m2flow_cfg=None)
    for side in ("m2flow", "trl"):
        assert len(result[side]["step_seconds"]) == 2 and [p["step"] for p in result[side]["curve"]] == [0, 1, 2]
    # the same base model, the same evaluator: the same accuracy before training
    assert result["m2flow"]["accuracy_start"] == result["trl"]["accuracy_start"]
    assert result["ratios"]["speedup"] > 0
    for name in ("vs_trl.json", "vs_trl.md", "vs_trl.png", "m2flow.json", "trl.json"):
        assert os.path.isfile(os.path.join(out, name))
    saved = json.load(open(os.path.join(out, "vs_trl.json")))
    assert saved["table"] == result["table"] and saved["machine"]["cpu"]

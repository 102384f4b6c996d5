"""Out-of-range values, unsafe names and missing files are one clear ConfigError before anything starts (issue 12)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from m2flow.cli import main
from m2flow.config import Config, ConfigError, load_config


@pytest.mark.parametrize("override, names", [
    ("train.lr=-1", ["train.lr", "> 0"]),
    ("train.lr=0", ["train.lr", "> 0"]),
    ("train.lr=inf", ["train.lr", "finite"]),
    ("train.lr=nan", ["train.lr", "finite"]),
    ("rollout.top_k=-5", ["rollout.top_k", ">= 0"]),
    ("eval.num_problems=-3", ["eval.num_problems", ">= 1"]),
    ("eval.num_problems=0", ["eval.num_problems", ">= 1"]),
    ("reward.timeout_s=0", ["reward.timeout_s", "> 0"]),
    ("reward.timeout_s=-2", ["reward.timeout_s", "> 0"]),
    ("reward.format_penalty=-1", ["reward.format_penalty", ">= 0"]),
    ("checkpoint.every=-1", ["checkpoint.every", ">= 0"]),
    ("checkpoint.keep_last=-1", ["checkpoint.keep_last", ">= 0"]),
    ("train.grad_clip=0", ["train.grad_clip", "> 0"]),
    ("train.warmup_steps=-1", ["train.warmup_steps", ">= 0"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", ">= 0"]),
    ("rollout.n=0", ["rollout.n"]),
    ("data.synthetic_train_size=0", ["data.synthetic_train_size", ">= 1"]),
    ("base.hidden_size=-8", ["base.hidden_size", ">= 1"]),
    ("data.synthetic_max_operand=1", ["data.synthetic_max_operand", ">= 2"]),
    ("data.synthetic_max_multiplier=1", ["data.synthetic_max_multiplier", ">= 2"]),
    ("cluster.num_cpus=0", ["cluster.num_cpus", ">= 1"]),
    ("name=../../x", ["name", "output_dir"]),
    ("name=a/b", ["name", "'/'"]),
    ("name=", ["name"]),
])
def test_out_of_range_value_is_rejected_naming_key_and_range(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override, "algorithm.filter_groups=false"] if override.startswith("rollout.n=") else [override])
    for name in names:
        assert name in str(err.value), (override, str(err.value))


def test_edges_of_the_ranges_are_accepted():
    cfg = load_config(None, ["rollout.top_k=0", "checkpoint.every=0", "checkpoint.keep_last=0", "eval.num_problems=1",
                             "train.lr=1e-9", "reward.timeout_s=0.1", "name=my-run.v2"])
    assert cfg.rollout.top_k == 0 and cfg.name == "my-run.v2"


def test_missing_model_and_data_paths(tmp_path):
    with pytest.raises(ConfigError, match="model.path .*does not exist"):
        load_config(None, [f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="model.path .*config.json.*has none"):
        load_config(None, [f"model.path={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_config(None, [f"model.path={tmp_path}"])
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_config(None, [f"model.path={tmp_path}"]).model.path == str(tmp_path)
    with pytest.raises(ConfigError, match="data.train_path: file not found"):
        load_config(None, [f"data.train_path={tmp_path / 'train.jsonl'}"])
    with pytest.raises(ConfigError, match="data.eval_path must be a .jsonl or .parquet file"):
        load_config(None, [f"data.eval_path={tmp_path / 'test.csv'}"])


def test_run_refuses_before_making_the_run_directory(tmp_path):
    from m2flow.runner import run

    out = tmp_path / "runs"
    cfg = dataclasses.replace(Config(), output_dir=str(out))
    cfg.data = dataclasses.replace(cfg.data, train_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="data.train_path"):
        run(cfg, progress=False)
    assert not out.exists()


def test_cli_prints_config_error_and_exits_2(capsys, tmp_path):
    assert main(["train", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2flow: config error:") and "train.lr" in err
    assert main(["train", f"model.path={tmp_path / 'nope'}"]) == 2
    assert "model.path" in capsys.readouterr().err

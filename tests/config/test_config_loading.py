from __future__ import annotations

import dataclasses

import pytest

from m2flow.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    save_config,
    validate,
)


def write(tmp_path, text: str, name: str = "exp.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert type(cfg.train).__name__ == "TrainConfig"  # plain dataclasses, not DictConfig


def test_yaml_then_overrides_precedence(tmp_path):
    path = write(tmp_path, "name: exp\ntrain:\n  lr: 1.0e-3\n  steps: 5\nrollout:\n  n: 4\n")
    cfg = load_config(path, ["train.lr=5e-4", "rollout.temperature=0.7", "cluster.address=null"])
    assert cfg.name == "exp"
    assert cfg.train.lr == 5e-4  # override beats YAML
    assert cfg.train.steps == 5  # YAML beats default
    assert cfg.rollout.n == 4
    assert cfg.rollout.temperature == 0.7
    assert cfg.train.prompts_per_step == Config().train.prompts_per_step  # untouched default
    assert cfg.cluster.address is None


def test_later_override_wins():
    assert load_config(overrides=["seed=1", "seed=2"]).seed == 2


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize(
    "yaml_text, key, suggestion, parent",
    [
        ("trian:\n  lr: 0.1\n", "trian", "'train'", "<root>"),
        ("train:\n  lrr: 0.1\n", "train.lrr", "'train.lr'", "train"),
        ("rollout:\n  temprature: 0.5\n", "rollout.temprature", "'rollout.temperature'", "rollout"),
    ],
)
def test_unknown_key_in_yaml(tmp_path, yaml_text, key, suggestion, parent):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"unknown config key '{key}'" in msg
    assert f"did you mean {suggestion}" in msg
    assert f"valid keys under '{parent}'" in msg
    assert path in msg


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("sead=3", "sead", "'seed'"),
        ("train.lrr=1e-4", "train.lrr", "'train.lr'"),
        ("algorithm.kl_coeff=0.1", "algorithm.kl_coeff", "'algorithm.kl_coef'"),
    ],
)
def test_unknown_key_in_override(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert f"unknown config key '{key}'; did you mean {suggestion}" in msg
    assert override in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'train.zzzz'") as err:
        load_config(overrides=["train.zzzz=1"])
    assert "did you mean" not in str(err.value)
    assert "micro_batch_size" in str(err.value)


@pytest.mark.parametrize(
    "override, key, expected, given",
    [
        ("train.steps=abc", "train.steps", "expects int", "'abc'"),
        ("train.lr=fast", "train.lr", "expects float", "'fast'"),
        ("train.fsdp=maybe", "train.fsdp", "expects bool", "'maybe'"),
        ("cluster.num_cpus=many", "cluster.num_cpus", "expects int or null", "'many'"),
        ("train=5", "train", "expects a section (TrainConfig)", "5"),
    ],
)
def test_type_error_names_key_type_and_value(override, key, expected, given):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert f"config key '{key}' {expected}" in msg
    assert f"got {given}" in msg


def test_type_error_in_yaml(tmp_path):
    path = write(tmp_path, "rollout:\n  n: lots\n")
    with pytest.raises(ConfigError, match=r"config key 'rollout.n' expects int, got 'lots'"):
        load_config(path)


@pytest.mark.parametrize("override", ["train.lr", "=3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match=f"malformed override '{override}'"):
        load_config(overrides=[override])


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(path)
    assert path in str(err.value)


def test_yaml_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_unparsable_yaml(tmp_path):
    path = write(tmp_path, "train: [\n")
    with pytest.raises(ConfigError, match="cannot parse config file") as err:
        load_config(path)
    assert path in str(err.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "section, changes, key",
    [
        ("rollout", {"n": 1}, "rollout.n"),
        ("rollout", {"temperature": -0.1}, "rollout.temperature"),
        ("rollout", {"top_p": 1.5}, "rollout.top_p"),
        ("rollout", {"top_p": -0.1}, "rollout.top_p"),
        ("rollout", {"max_new_tokens": 0}, "rollout.max_new_tokens"),
        ("train", {"steps": 0}, "train.steps"),
        ("train", {"prompts_per_step": -1}, "train.prompts_per_step"),
        ("train", {"micro_batch_size": 0}, "train.micro_batch_size"),
        ("eval", {"max_new_tokens": 0}, "eval.max_new_tokens"),
        ("algorithm", {"clip_ratio_low": -0.1}, "algorithm.clip_ratio_low"),
        ("algorithm", {"clip_ratio_high": -0.1}, "algorithm.clip_ratio_high"),
        ("model", {"dtype": "float16"}, "model.dtype"),
        ("cluster", {"placement": "pipelined"}, "cluster.placement"),
        ("cluster", {"placement": {"rollout": "0"}}, "cluster.placement"),  # no actor
        ("cluster", {"placement": {"rollout": "0", "actor": "0-1"}}, "cluster.placement"),  # partial overlap
        ("cluster", {"placement": {"rollout": "0", "actor": "2", "trainer": "1"}}, "cluster.placement"),
        ("cluster", {"placement": {"rollout": "0", "actor": "2"}, "devices": 2}, "cluster.placement"),  # past 0-1
        ("data", {"template": "alpaca"}, "data.template"),
        ("rollout", {"backend": "vllm"}, "rollout.backend"),
        ("cluster", {"device_memory_gb": 0.0}, "cluster.device_memory_gb"),
        ("rollout.engine", {"block_size": 0}, "rollout.engine.block_size"),
        ("rollout.engine", {"kv_cache_gb": -1.0}, "rollout.engine.kv_cache_gb"),
        ("rollout.engine", {"kv_cache_fraction": 0.0}, "rollout.engine.kv_cache_fraction"),
        ("rollout.engine", {"kv_cache_fraction": 1.5}, "rollout.engine.kv_cache_fraction"),
        ("rollout.engine", {"max_num_batched_tokens": 0}, "rollout.engine.max_num_batched_tokens"),
        ("rollout.engine", {"max_num_seqs": 0}, "rollout.engine.max_num_seqs"),
        ("rollout.engine", {"max_model_len": -1}, "rollout.engine.max_model_len"),
    ],
)
def test_validate_rejects(section, changes, key):
    cfg = Config()
    parent, _, name = section.rpartition(".")
    owner = getattr(cfg, parent) if parent else cfg
    setattr(owner, name, dataclasses.replace(getattr(owner, name), **changes))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_a_key_that_moved_names_its_successor():
    with pytest.raises(ConfigError, match=r"rollout\.sleep_between_steps' is gone: use cluster\.context_switch"):
        load_config(None, ["rollout.sleep_between_steps=true"])


def test_validate_lists_valid_choices():
    cfg = Config()
    cfg.cluster.placement = "auto"
    with pytest.raises(ConfigError, match="collocated"):
        validate(cfg)
    cfg = Config()
    cfg.data.template = "alpaca"
    with pytest.raises(ConfigError, match="chat, plain"):
        validate(cfg)


def test_validate_accepts_single_sample_without_grpo(monkeypatch):
    from m2flow.algorithms import ADVANTAGE_ESTIMATORS

    monkeypatch.setitem(ADVANTAGE_ESTIMATORS._fns, "reinforce", lambda scores, group_ids, **_: scores)
    cfg = Config()
    cfg.algorithm.advantage = "reinforce"
    cfg.rollout.n = 1
    cfg.algorithm.filter_groups = False  # singleton groups are never informative
    validate(cfg)


def test_validate_rejects_unknown_registry_names():
    for key, section, value in [("algorithm.advantage", "algorithm", "grpoo"), ("algorithm.loss_agg", "algorithm", "x"),
                                ("reward.name", "reward", "nope"), ("rollout.backend", "rollout", "vllm")]:
        cfg = Config()
        setattr(getattr(cfg, section), key.split(".")[1], value)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*one of"):
            validate(cfg)


def test_load_config_validates():
    with pytest.raises(ConfigError, match=r"rollout\.n must be >= 2"):
        load_config(overrides=["rollout.n=1"])


def test_config_templates_match_implemented_templates():
    from m2flow.config import TEMPLATES
    from m2flow.data import templates

    assert TEMPLATES == templates.TEMPLATES


def test_save_config_round_trip(tmp_path):
    overrides = ["name=roundtrip", "train.lr=3e-5", "cluster.address=auto", "model.dtype=bfloat16"]
    cfg = load_config(overrides=overrides)
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_save_config_overwrites(tmp_path):
    path = str(tmp_path / "config.yaml")
    save_config(Config(), path)
    cfg = load_config(overrides=["seed=9"])
    save_config(cfg, path)
    assert load_config(path).seed == 9


def test_config_to_dict():
    d = config_to_dict(Config())
    assert d["train"]["lr"] == Config().train.lr
    assert d["cluster"]["address"] is None
    assert isinstance(d["rollout"], dict)


@pytest.mark.parametrize("estimator", ["dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_need_several_samples(estimator):
    with pytest.raises(ConfigError, match="rollout.n must be >= 2"):
        load_config(None, [f"algorithm.advantage={estimator}", "rollout.n=1"])


def test_engine_settings_are_one_section():
    """rollout.engine is the engine's own EngineConfig (one dataclass, no field-by-field copy); a bad kernel
    choice is a ConfigError naming the key."""
    from m2flow.rollout import EngineConfig

    cfg = load_config(None, ["rollout.engine.max_num_seqs=64", "rollout.engine.kernels=torch"])
    assert isinstance(cfg.rollout.engine, EngineConfig)
    assert (cfg.rollout.engine.max_num_seqs, cfg.rollout.engine.kernels) == (64, "torch")
    with pytest.raises(ConfigError, match=r"rollout.engine.kernels\) must be one of auto, triton, torch, got 'flash'"):
        load_config(None, ["rollout.engine.kernels=flash"])
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.batch_size'"):
        load_config(None, ["rollout.batch_size=64"])

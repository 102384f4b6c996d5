"""Validation of the algorithm / reward-shaping / critic options (issue 4): every rule names its key."""

from __future__ import annotations

import pytest

from m2flow.config import GROUP_ESTIMATORS, Config, ConfigError, load_config


def test_new_defaults_are_off():
    a, rw = Config().algorithm, Config().reward
    assert (a.clip_ratio_c, a.tis_cap, a.kl_in_reward, a.value_clip, a.overlong_filter) == (None, None, False, None, False)
    assert (a.gamma, a.lam, a.whiten_advantages, a.dynamic_sampling_max_tries) == (1.0, 1.0, False, 1)
    assert (rw.overlong_buffer, rw.overlong_penalty, rw.scale, rw.clip) == (0, 1.0, 1.0, None)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.clip_ratio_c=3.0", "algorithm.tis_cap=2.0", "algorithm.whiten_advantages=true"],
        ["algorithm.advantage=gae", "algorithm.value_clip=0.2", "algorithm.gamma=0.99", "algorithm.lam=0.95",
         "critic.lr=1e-4", "critic.warmup_steps=3"],
        ["algorithm.advantage=gae", "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=true"],
        ["algorithm.advantage=reinforce_pp", "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=true",
         "rollout.n=1", "algorithm.filter_groups=false"],
        ["algorithm.advantage=reinforce_pp_baseline", "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=true"],
        ["algorithm.dynamic_sampling_max_tries=4", "algorithm.overlong_filter=true", "reward.overlong_buffer=16",
         "reward.overlong_penalty=0.5", "reward.scale=2.0", "reward.clip=1.0"],
        ["algorithm.policy_loss=gspo", "algorithm.tis_cap=1.5"],
        ["reward.overlong_buffer=48"],  # the whole response length
    ],
)
def test_valid_combinations_load(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        # dual-clip
        (["algorithm.clip_ratio_c=1.0"], r"algorithm\.clip_ratio_c .*must be > 1"),
        (["algorithm.clip_ratio_c=0.5"], r"algorithm\.clip_ratio_c .*must be > 1"),
        (["algorithm.policy_loss=gspo", "algorithm.clip_ratio_c=3.0"],
         r"algorithm\.clip_ratio_c .*not defined for algorithm\.policy_loss=gspo"),
        # truncated importance sampling
        (["algorithm.tis_cap=0"], r"algorithm\.tis_cap must be > 0"),
        (["algorithm.tis_cap=-1.0"], r"algorithm\.tis_cap must be > 0"),
        # discount / GAE lambda
        (["algorithm.gamma=1.5"], r"algorithm\.gamma must be in \[0, 1\]"),
        (["algorithm.lam=-0.1"], r"algorithm\.lam must be in \[0, 1\]"),
        # KL in the reward
        (["algorithm.advantage=reinforce_pp", "algorithm.kl_in_reward=true"],
         r"algorithm\.kl_in_reward needs algorithm\.kl_coef > 0"),
        (["algorithm.kl_coef=0.1", "algorithm.kl_in_reward=true"],
         r"algorithm\.kl_in_reward needs a token-level algorithm\.advantage, one of reinforce_pp, "
         r"reinforce_pp_baseline, gae; got 'grpo'"),
        (["algorithm.kl_coef=-0.1"], r"algorithm\.kl_coef must be >= 0"),
        # critic
        (["algorithm.value_clip=0.2"], r"algorithm\.value_clip .*algorithm\.advantage=gae"),
        (["algorithm.advantage=gae", "algorithm.value_clip=0"], r"algorithm\.value_clip must be > 0"),
        (["algorithm.advantage=gae", "critic.lr=0"], r"critic\.lr must be > 0"),
        (["critic.warmup_steps=-1"], r"critic\.warmup_steps must be >= 0"),
        (["critic.grad_clip=0"], r"critic\.grad_clip must be > 0"),
        # filters and dynamic sampling
        (["algorithm.dynamic_sampling_max_tries=0"], r"algorithm\.dynamic_sampling_max_tries must be >= 1"),
        (["algorithm.dynamic_sampling_max_tries=3", "algorithm.filter_groups=false"],
         r"algorithm\.dynamic_sampling_max_tries=3 .*needs algorithm\.filter_groups=true"),
        (["algorithm.advantage=reinforce_pp", "rollout.n=1"],
         r"algorithm\.filter_groups needs rollout\.n >= 2.*set algorithm\.filter_groups=false"),
        # reward shaping
        (["reward.overlong_buffer=-1"], r"reward\.overlong_buffer must be in \[0, rollout\.max_new_tokens=48\]"),
        (["reward.overlong_buffer=49"], r"reward\.overlong_buffer must be in \[0, rollout\.max_new_tokens=48\]"),
        (["reward.overlong_penalty=-1"], r"reward\.overlong_penalty must be >= 0"),
        (["reward.scale=0"], r"reward\.scale must be > 0"),
        (["reward.clip=0"], r"reward\.clip must be > 0"),
        # the estimator list includes gae
        (["algorithm.advantage=ppo"], r"algorithm\.advantage must be one of dr_grpo, gae, grpo, reinforce_pp, "
                                      r"reinforce_pp_baseline, rloo; got 'ppo'"),
    ],
)
def test_invalid_combinations_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_reinforce_pp_baseline_is_a_group_estimator():
    assert "reinforce_pp_baseline" in GROUP_ESTIMATORS
    with pytest.raises(ConfigError, match=r"rollout\.n must be >= 2 when algorithm\.advantage is 'reinforce_pp_baseline'"):
        load_config(None, ["algorithm.advantage=reinforce_pp_baseline", "rollout.n=1", "algorithm.filter_groups=false"])


def test_critic_section_in_yaml(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("algorithm:\n  advantage: gae\n  value_clip: 0.5\ncritic:\n  lr: 2.0e-4\n")
    cfg = load_config(str(path))
    assert cfg.critic.lr == 2e-4 and cfg.algorithm.value_clip == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'critic\.lrr'; did you mean 'critic\.lr'"):
        load_config(str(path), ["critic.lrr=1"])

"""The algorithm recipes in configs/ (issue 4): one per algorithm, each loads, validates and says what it is."""

from __future__ import annotations

import os

import pytest

from m2flow.config import Config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = ["grpo", "dr_grpo", "dapo", "ppo", "reinforce_pp", "rloo", "gspo"]


def recipe(name: str) -> Config:
    return load_config(os.path.join(ROOT, "configs", f"tiny_math_{name}.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_on_the_default_task(name):
    cfg = recipe(name)
    default = Config()
    # the same task and budget as the default experiment, so their held-out accuracies compare
    for section in ("base", "data", "eval", "model"):
        assert getattr(cfg, section) == getattr(default, section), (name, section)
    assert (cfg.train.steps, cfg.train.prompts_per_step, cfg.rollout.n) == (30, 64, 8)
    assert cfg.name == f"tiny-math-{name.replace('_', '-')}"


def test_recipes_choose_their_algorithm():
    a = {name: recipe(name).algorithm for name in RECIPES}
    assert a["grpo"] == Config().algorithm
    assert (a["dr_grpo"].advantage, a["dr_grpo"].loss_agg) == ("dr_grpo", "seq-mean-token-sum-norm")
    dapo, dapo_reward = a["dapo"], recipe("dapo").reward
    assert (dapo.clip_ratio_high, dapo.loss_agg, dapo.kl_coef) == (0.28, "token-mean", 0.0)
    assert dapo.filter_groups and dapo.dynamic_sampling_max_tries > 1 and dapo_reward.overlong_buffer > 0
    assert (a["ppo"].advantage, a["ppo"].filter_groups) == ("gae", False) and a["ppo"].value_clip
    rpp = a["reinforce_pp"]
    assert (rpp.advantage, rpp.kl_in_reward) == ("reinforce_pp", True) and rpp.kl_coef > 0  # -> a reference model
    assert a["rloo"].advantage == "rloo"
    assert (a["gspo"].policy_loss, a["gspo"].loss_agg) == ("gspo", "seq-mean-token-mean")
    assert a["gspo"].clip_ratio_high < 1e-3

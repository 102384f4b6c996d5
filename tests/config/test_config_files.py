from __future__ import annotations

import glob
import os

import pytest

from m2flow.config import Config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_tiny_config_is_the_demo_default():
    assert load_config(os.path.join(ROOT, "configs", "tiny_math_grpo.yaml")) == Config()

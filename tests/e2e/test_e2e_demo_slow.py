"""The default experiment itself (about 10 minutes on 2 CPU cores): `make test-slow`."""

from __future__ import annotations

import pytest

from m2flow.config import load_config
from m2flow.runner import run


@pytest.mark.slow
def test_default_experiment_gains_ten_points(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", f"base.cache_dir={tmp_path / 'cache'}"])
    summary = run(cfg, progress=False)
    assert summary["held_out_problems"] == 500
    assert summary["held_out_gain"] >= 0.10, summary
    assert summary["held_out_worked_share_after"] > summary["held_out_worked_share_before"]

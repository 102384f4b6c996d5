"""The default experiment itself, for two seeds (about 10 minutes on 2 CPU cores): `make test-slow`.

Each seed builds its own base model and runs GRPO; every seed must gain at least 15 points of held-out
accuracy (the floor the README's seed table is held to)."""

from __future__ import annotations

import pytest

from m2flow.bench.learning import run_seeds

SEEDS = [0, 1]


@pytest.mark.slow
def test_default_experiment_gains_fifteen_points_on_every_seed(tmp_path):
    result = run_seeds(SEEDS, [f"output_dir={tmp_path / 'runs'}", f"base.cache_dir={tmp_path / 'cache'}"],
                       progress=False, out_dir=str(tmp_path / "seeds"))
    assert [r["seed"] for r in result["rows"]] == SEEDS
    for row in result["rows"]:
        assert row["gain"] >= 0.15, result["table"]
        assert row["worked_share_after"] > row["worked_share_before"], result["table"]
    assert (tmp_path / "seeds" / "seeds.png").stat().st_size > 1000

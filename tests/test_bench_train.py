"""The trainer benchmark on a micro model (the timings are measurements; here the plumbing and the table)."""

from __future__ import annotations

import json
import os

from m2flow.bench.train import format_devices_table, format_table, run_devices_benchmark, run_train_benchmark
from m2flow.config import load_config
from m2flow.training.checkpoint import save_hf_checkpoint


def test_train_benchmark_runs_every_variant_on_the_same_batch(tmp_path, make_micro_model, tokenizer, chat_prompts):
    model = make_micro_model(0)
    path = save_hf_checkpoint(str(tmp_path / "model"), model.config, model.state_dict(), tokenizer)
    cfg = load_config(None, ["rollout.n=2", "rollout.max_new_tokens=8", "train.micro_batch_size=3"])
    result = run_train_benchmark(cfg, path, chat_prompts(3), ["1", "2", "3"], budgets=[64, 256], repeats=1,
                                 out_dir=str(tmp_path / "out"))
    assert result["sequences"] == 6
    assert 0 < result["real_tokens"] <= result["padded_tokens"]
    assert 0 < result["shared_prompt_tokens"] < result["real_tokens"]  # 3 prompts x 2 samples: each prompt once
    names = [r["variant"] for r in result["rows"]]
    assert names[:5] == ["padded, micro_batch_size=3"] + [
        f"packed, max_tokens_per_microbatch={b}, {s}" for b in (64, 256) for s in ("a prompt per sample", "shared prompts")]
    assert len(names) == 6 and names[5].startswith("packed, max_tokens_per_microbatch=64, shared prompts, the ")
    assert names[5].endswith(" sequences with advantage 0 skipped")
    first = result["rows"][0]
    assert first["speedup_update"] == 1.0
    assert first["trainer_s_recompute"] == first["logprobs_s"] + first["update_s"]
    saved = json.loads(open(result["path"]).read())
    assert saved["rows"] == result["rows"]
    table = format_table(result)
    assert table.splitlines()[0].startswith("6 sequences") and "| padded, micro_batch_size=3 |" in table


def test_devices_benchmark_runs_the_trainer_group_on_each_device_count(tmp_path, make_micro_model, tokenizer,
                                                                      chat_prompts):
    model = make_micro_model(0)
    path = save_hf_checkpoint(str(tmp_path / "model"), model.config, model.state_dict(), tokenizer)
    cores = sorted(os.sched_getaffinity(0))
    counts = [1, min(2, len(cores))]
    cfg = load_config(None, ["rollout.n=2", "rollout.max_new_tokens=8", "train.max_tokens_per_microbatch=64",
                             "algorithm.filter_groups=false"])
    result = run_devices_benchmark(cfg, path, chat_prompts(3), ["1", "2", "3"], counts, repeats=1,
                                   out_dir=str(tmp_path / "out"))
    rows = result["rows"]
    assert [r["devices"] for r in rows] == [r["ranks"] for r in rows] == counts
    assert rows[0]["cores"] == [cores] and sorted(c for cs in rows[1]["cores"] for c in cs) == cores
    assert rows[0]["scaling"] == 1.0
    for r in rows:
        assert r["logprobs_s"] > 0 and r["update_s"] > 0
        assert r["trainer_tokens_per_s"] == result["real_tokens"] / (r["logprobs_s"] + r["update_s"])
    assert json.loads(open(result["path"]).read())["rows"] == rows
    table = format_devices_table(result)
    assert table.splitlines()[0].startswith("6 sequences") and "| 1 | " in table


def test_memory_benchmark_measures_each_chunk_size_in_its_own_process():
    from m2flow.bench.memory import format_table, run_memory_benchmark

    result = run_memory_benchmark(vocab=4000, sequences=4, prompt=8, response=16, chunks=(0, 16))
    assert [r["logits_chunk_tokens"] for r in result["rows"]] == [0, 16]
    assert all(r["peak_rss_mb"] >= r["rss_before_update_mb"] > 50 for r in result["rows"])
    assert result["rows"][0]["peak_vs_full"] == 1.0
    assert result["full_logits_fp32_gb"] == 4 * 16 * 4000 * 4 / 2**30
    assert "| 0 (full logits) |" in format_table(result) and "| 16 |" in format_table(result)

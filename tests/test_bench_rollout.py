"""`m2flow bench rollout` runs end to end on the tiny preset (a smoke run: speed is measured by the
command, never asserted in tests) and writes its JSON result."""

from __future__ import annotations

import json

import torch

from m2flow.bench.rollout import hf_generate, run_benchmark
from m2flow.rollout import SamplingParams


def test_bench_rollout_writes_rows_for_each_batch_size(tmp_path):
    torch.set_num_threads(1)
    result = run_benchmark("tiny", batch_sizes=(1, 4), new_tokens=6, repeats=1, out_dir=str(tmp_path), log=lambda s: None)
    saved = json.loads(open(result["path"]).read())
    assert result["path"].endswith("-tiny.json") and saved["preset"] == "tiny" and saved["dtype"] == "float32"
    assert saved["cuda_graphs"] is False and saved["triton_kernels"] is False  # CPU: plain PyTorch paths
    assert [r["batch_size"] for r in saved["rows"]] == [1, 4]
    for row in saved["rows"]:
        assert row["new_tokens"] == 6 and row["prompt_tokens"] > 0
        assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
        assert abs(row["ratio"] - row["ours_tokens_per_s"] / row["hf_tokens_per_s"]) < 1e-9
        assert row["bandwidth_fraction"] is None  # measured on CUDA only


def test_hf_generate_counts_tokens_up_to_eos(make_micro_model, tokenizer):
    model = make_micro_model(seed=1).eval()
    ids = [tokenizer("1 + 2 =", add_special_tokens=False)["input_ids"], [5, 6]]
    fixed = hf_generate(model, ids, SamplingParams(n=2, max_new_tokens=5, ignore_eos=True), tokenizer)
    assert fixed == [5, 5, 5, 5]
    eos = tokenizer.eos_token_id

    def eos_first(module, inputs, logits):  # EOS the only likely token: every sequence stops after one
        return logits.index_add(-1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), 100.0))

    model.lm_head.register_forward_hook(eos_first)
    stopped = hf_generate(model, ids, SamplingParams(n=1, max_new_tokens=5, temperature=0.5), tokenizer)
    assert stopped == [1, 1]


def test_profile_counts_the_same_ops_per_decode_step_at_any_batch_size(tmp_path):
    """The profile's per-step numbers come from two generations' difference; a batched engine dispatches
    the same ops per decode step whatever the batch size (no per-sequence loops over tensors)."""
    torch.set_num_threads(1)
    result = run_benchmark("tiny", batch_sizes=(2, 8), new_tokens=4, repeats=1, out_dir=str(tmp_path), compare_hf=False,
                           profile=True, log=lambda s: None)
    saved = json.loads(open(result["path"]).read())
    small, large = saved["profile"]
    assert [small["batch_size"], large["batch_size"]] == [2, 8]
    assert small["device_busy_ms_per_step"] is None and small["wall_ms_per_step"] > 0  # CPU
    assert small["aten_ops_per_step"] > 4 * 20  # 4 layers of matmuls, norms, attention...
    assert abs(large["aten_ops_per_step"] - small["aten_ops_per_step"]) <= 0.02 * small["aten_ops_per_step"]
    text = open(result["profile_path"]).read()
    assert text.startswith("batch 2: ") and "batch 8: " in text and "aten::mm" in text

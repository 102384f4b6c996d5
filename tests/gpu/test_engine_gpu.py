"""The engine on a GPU: CUDA graphs, the paged Triton kernel, bf16, sleep/wake with weight offload.

Marked `gpu` and deselected by default (`make test-gpu` or `benchmarks/gpu_check.sh` run them on a GPU
machine). M2FLOW_TEST_DEVICE=cpu runs the same code paths on CPU (no graph capture, the kernel in Triton's
interpreter) to catch errors before a GPU is at hand."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from m2flow.batch import RolloutBatch
from m2flow.rollout import HFEngine, SamplingParams
from m2flow.rollout.engine import Engine, EngineConfig
from m2flow.rollout.model_runner import ModelRunner
from m2flow.training.checkpoint import save_hf_checkpoint
from m2flow.training.forward import response_logits, token_logprobs

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("M2FLOW_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
STOP = list(range(100, 130))


@pytest.fixture(scope="module", autouse=True)
def _device():
    assert not CUDA or torch.cuda.is_available(), "these tests need a GPU (or M2FLOW_TEST_DEVICE=cpu)"


@pytest.fixture(scope="module")
def hf_model(micro_config):
    from m2flow.models.tiny import make_tiny_model

    cfg = copy.deepcopy(micro_config)
    cfg.initializer_range = 0.25  # peaked, varied distributions: outputs differ and stop at different steps
    return make_tiny_model(cfg, seed=3).eval()


@pytest.fixture(scope="module")
def model_dir(hf_model, tokenizer, tmp_path_factory):
    return save_hf_checkpoint(str(tmp_path_factory.mktemp("micro") / "model"), hf_model.config,
                              hf_model.state_dict(), tokenizer)


@pytest.fixture(scope="module")
def prompts(chat_prompts):
    return chat_prompts(56, seed=4)


def make_engine(model_dir, dtype="float32", **config) -> Engine:
    config.setdefault("max_model_len", 256)
    config.setdefault("max_num_seqs", 256)
    engine = Engine.from_pretrained(model_dir, EngineConfig(**config), dtype=dtype, device=DEVICE)
    if not CUDA and config.get("cuda_graphs", True):  # on CPU: what a GPU engine builds, without capture
        c = engine.config
        engine.runner = ModelRunner(engine.model, c.block_size, engine.num_blocks, c.max_num_seqs,
                                    engine.max_model_len, triton_kernels=True, static_decode=True, cuda_graphs=False)
    return engine


def _tokens(samples):
    return [s.token_ids for s in samples]


def test_engine_uses_graphs_and_the_triton_kernels(model_dir):
    engine = make_engine(model_dir, max_num_seqs=40)
    assert engine.model.model.layers[0].self_attn.decode_kernel is not None
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16, 32, 40]
    if CUDA:
        assert sorted(graphs.graphs) == graphs.sizes


def test_greedy_matches_hf_generate(model_dir, hf_model, tokenizer, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    ours = make_engine(model_dir).generate(prompts, params)
    ref = HFEngine(copy.deepcopy(hf_model).to(DEVICE), tokenizer).generate(prompts, params)
    assert _tokens(ours) == _tokens(ref)
    assert {s.finish_reason for s in ours} == {"stop", "length"}
    for a, b in zip(ours, ref):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_graphs_match_eager_with_preemption(model_dir, prompts):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=20, seed=9, stop_token_ids=STOP)
    eager = make_engine(model_dir, cuda_graphs=False, kernels="torch").generate(prompts[:10], params)
    graphs = make_engine(model_dir).generate(prompts[:10], params)
    tiny = make_engine(model_dir, block_size=4, kv_cache_gb=40 * 4 * 256 / 2**30)  # 40 blocks: preemption
    squeezed = tiny.generate(prompts[:10], params)
    assert tiny.batcher.num_preemptions > 0
    for out in (graphs, squeezed):
        assert _tokens(out) == _tokens(eager)
        for a, b in zip(out, eager):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_bfloat16_tracks_the_bf16_trainer(model_dir, hf_model, tokenizer, prompts):
    engine = make_engine(model_dir, dtype="bfloat16")
    samples = engine.generate(prompts[:16], SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=0))
    batch = RolloutBatch.from_samples(samples, tokenizer.pad_token_id)
    model = copy.deepcopy(hf_model).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        logits = response_logits(model, batch.input_ids.to(DEVICE), batch.attention_mask.to(DEVICE),
                                 batch.response_mask.shape[1])
        trainer = token_logprobs(logits, batch.input_ids[:, batch.prompt_width :].to(DEVICE), 1.0).cpu()
    mask = batch.response_mask.bool()
    rollout = batch.rollout_logprobs[mask]
    assert torch.isfinite(rollout).all() and rollout.numel() > 100
    assert (trainer[mask] - rollout).abs().mean() < 0.05


def test_sleep_with_offload_and_wake(model_dir, prompts):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=1)
    engine = make_engine(model_dir)
    before = engine.generate(prompts[:8], params)
    allocated = torch.cuda.memory_allocated() if CUDA else 0
    engine.sleep(offload_weights=True)
    if CUDA:
        assert torch.cuda.memory_allocated() < allocated
    engine.wake()
    assert engine.runner.graphs is not None
    assert _tokens(engine.generate(prompts[:8], params)) == _tokens(before)

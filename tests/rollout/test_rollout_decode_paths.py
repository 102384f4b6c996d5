"""The GPU decode paths, checked on CPU: the paged Triton kernel (in Triton's interpreter) and the padded
static buffers that CUDA graphs replay (run eagerly here) give the results of the default gather path."""

from __future__ import annotations

import pytest
import torch

from m2flow.rollout import SamplingParams
from m2flow.rollout.engine import Engine, EngineConfig
from m2flow.rollout.model_runner import DECODE_ROWS, DecodeGraphs, ModelRunner
from m2flow.training.checkpoint import save_hf_checkpoint

STOP = list(range(100, 130))  # frequent enough that some sampled sequences stop early


@pytest.fixture(scope="module")
def model_dir(make_micro_model, tokenizer, tmp_path_factory):
    model = make_micro_model(seed=5)
    for p in model.parameters():  # a wider init: varied, peaked next-token distributions
        p.data.mul_(8.0)
    return save_hf_checkpoint(str(tmp_path_factory.mktemp("micro") / "model"), model.config, model.state_dict(),
                              tokenizer)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs natively on a GPU machine


def make_engine(model_dir, triton_kernels=False, static_decode=False) -> Engine:
    config = EngineConfig(max_num_seqs=24, max_model_len=160, cuda_graphs=False, kernels="torch")
    engine = Engine.from_pretrained(model_dir, config, device=DEVICE)
    if triton_kernels or static_decode:  # what a GPU engine builds (without capturing graphs on a CPU)
        engine.runner = ModelRunner(engine.model, engine.config.block_size, engine.num_blocks, 24, 160,
                                    triton_kernels=triton_kernels, static_decode=static_decode, cuda_graphs=False)
    return engine


@pytest.fixture(scope="module")
def prompts(chat_prompts):
    return chat_prompts(5, seed=11)


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    """Greedy and sampled outputs of the default (gather) path: 5 prompts x 3 samples = 15 sequences."""
    engine = make_engine(model_dir)
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=14))
    sampled = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=14, seed=3, stop_token_ids=STOP))
    assert {s.finish_reason for s in sampled} == {"stop", "length"}, "sequences end at different steps"
    return greedy, sampled


def _same(ours, ref, atol):
    assert [s.token_ids for s in ours] == [s.token_ids for s in ref]
    assert [s.finish_reason for s in ours] == [s.finish_reason for s in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("triton_kernels, static_decode", [(True, False), (False, True), (True, True)])
def test_decode_paths_match_the_gather_path(model_dir, prompts, reference, triton_kernels, static_decode):
    engine = make_engine(model_dir, triton_kernels, static_decode)
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=14))
    sampled = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=14, seed=3, stop_token_ids=STOP))
    _same(greedy, reference[0], atol=1e-4)
    _same(sampled, reference[1], atol=1e-4)


def test_static_buffers_pad_to_bucket_sizes(model_dir, prompts):
    """15 sequences run in the 16-row bucket, 5 in the 8-row one; padded rows write only the scratch block."""
    engine = make_engine(model_dir, static_decode=True)
    graphs = engine.runner.graphs
    assert isinstance(graphs, DecodeGraphs) and graphs.sizes == [1, 2, 4, 8, 16, 24]
    assert graphs.scratch == engine.num_blocks and engine.runner.kv_cache.shape[2] == engine.num_blocks + 1
    sizes = []
    forward = graphs._forward
    graphs._forward = lambda size: sizes.append(size) or forward(size)
    engine.generate(prompts[:5], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert sizes == [8] * 3  # 5 sequences, 3 decode steps after the prefill
    rows = dict(zip(DECODE_ROWS, graphs.inputs[:, 5:8].tolist()))
    assert rows["context_lens"] == [1, 1, 1] and rows["slot_blocks"] == [engine.num_blocks] * 3


def test_sleep_and_wake_rebuild_the_static_buffers(model_dir, prompts, reference):
    engine = make_engine(model_dir, static_decode=True)
    engine.sleep()
    assert engine.runner.graphs is None  # graphs hold the freed cache's addresses
    engine.wake()
    assert engine.runner.graphs is not None
    _same(engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=14)), reference[0], atol=1e-4)


def test_kernel_choices(model_dir):
    with pytest.raises(ValueError, match=r"kernels \(rollout.engine.kernels\) must be one of auto, triton, torch"):
        EngineConfig(kernels="flash")
    engine = Engine.from_pretrained(model_dir, EngineConfig(max_num_seqs=4, max_model_len=64))
    assert engine.model.model.layers[0].self_attn.decode_kernel is None  # auto on CPU: the gather path
    assert engine.runner.graphs is None  # no CUDA graphs on CPU


def test_triton_on_cpu_needs_the_interpreter(model_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a GPU"):
        Engine.from_pretrained(model_dir, EngineConfig(max_num_seqs=4, max_model_len=64, kernels="triton"))


def test_compiled_decode_matches_the_gather_path(model_dir, prompts, reference):
    """torch.compile'd decode steps (one graph for batch 1, one dynamic graph for the rest) give the eager
    path's tokens, and logprobs within 1e-4 (the fused reductions round differently)."""
    from torch._dynamo.utils import counters

    config = EngineConfig(max_num_seqs=24, max_model_len=160, cuda_graphs=False, kernels="torch", compile=True)
    engine = Engine.from_pretrained(model_dir, config, device=DEVICE)
    graphs_before = counters["stats"]["unique_graphs"]
    _same(engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=14)), reference[0], atol=1e-4)
    sampled = SamplingParams(n=3, temperature=1.0, max_new_tokens=14, seed=3, stop_token_ids=STOP)
    _same(engine.generate(prompts, sampled), reference[1], atol=1e-4)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=20))  # batch 1, longer contexts
    # the decode step with its sampling: one graph for batch 1 and one for every other batch size and width
    assert counters["stats"]["unique_graphs"] - graphs_before == 2
    engine.sleep()  # a new KV cache: the compiled step (whose module guards are skipped) uses the new one
    engine.wake()
    (one,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=14))
    written = (engine.runner.kv_cache[0, 0].abs().sum(-1) > 0).sum().item()  # (slot, KV head) pairs, layer 0
    assert written == (len(one.prompt_ids) + len(one.token_ids) - 1) * engine.model.args.num_kv_heads
    _same(engine.generate(prompts, sampled), reference[1], atol=1e-4)


def test_compile_is_for_the_eager_torch_path(model_dir):
    with pytest.raises(ValueError, match="compile applies to the eager PyTorch decode path"):
        Engine(Engine.from_pretrained(model_dir, EngineConfig(max_num_seqs=4, max_model_len=64)).model, None,
               EngineConfig(max_num_seqs=4, max_model_len=64, kernels="triton", compile=True))


def test_compiled_engines_of_two_architectures_share_a_process(model_dir, prompts, micro_config, tokenizer, tmp_path):
    """Compiled graphs are cached per function, not per engine: a second engine with another architecture
    (here 3 layers instead of 2) must not run the first one's graph (the guards keep its tensor shapes)."""
    from m2flow.models.tiny import make_tiny_model, tiny_qwen2_config

    m = micro_config
    config = tiny_qwen2_config(m.vocab_size, hidden_size=m.hidden_size, num_layers=3, num_heads=m.num_attention_heads,
                               num_kv_heads=m.num_key_value_heads, intermediate_size=m.intermediate_size,
                               eos_token_id=m.eos_token_id, pad_token_id=m.pad_token_id)
    other = save_hf_checkpoint(str(tmp_path / "three-layers"), config, make_tiny_model(config, seed=2).state_dict(),
                               tokenizer)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=5)
    for path in (model_dir, other):
        eager = make_engine(path).generate(prompts, params)
        compiled = Engine.from_pretrained(path, EngineConfig(max_num_seqs=24, max_model_len=160, kernels="torch",
                                                              compile=True), device=DEVICE)
        _same(compiled.generate(prompts, params), eager, atol=1e-4)

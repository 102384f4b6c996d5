"""Context switching's moves on a GPU (training/offload.py): a trainer's parameters, gradients and Adam state leave
the GPU on offload (its allocated memory drops by their bytes) and come back on onload, and training goes on
exactly as if they had never left.

Marked `gpu` and deselected by default (`make test-gpu` or `benchmarks/gpu_check.sh` run it on a GPU machine).
M2FLOW_TEST_DEVICE=cpu runs the same code on CPU, where the moves are no-ops."""

from __future__ import annotations

import os

import pytest
import torch

from m2flow.training.offload import TrainerState

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("M2FLOW_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")


def _step(model, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    ids = torch.randint(0, 200, (2, 12), device=DEVICE)
    optimizer.zero_grad(set_to_none=True)
    model(ids).logits.float().logsumexp(-1).mean().backward()
    optimizer.step()


def test_offload_frees_the_gpu_and_onload_trains_on_exactly(make_micro_model):
    assert not CUDA or torch.cuda.is_available(), "this test needs a GPU (or M2FLOW_TEST_DEVICE=cpu)"
    models = [make_micro_model(seed=0).to(DEVICE) for _ in range(2)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    for m, o in zip(models, optimizers):
        _step(m, o, seed=1)
    state = TrainerState(models[0], DEVICE, optimizers[0], accumulating=lambda: False)
    parts = state.part_bytes()
    allocated = torch.cuda.memory_allocated() if CUDA else 0
    state.offload({"params", "optimizer"})
    if CUDA:
        freed = allocated - torch.cuda.memory_allocated()
        # parameters, their (freed) gradients and Adam's moments: all of it left (0-dim step counters stay)
        assert freed >= 0.95 * (parts["params"] + parts["optimizer"]), (freed, parts)
        assert all(p.device.type == "cpu" for p in models[0].parameters())
        assert all(s["exp_avg"].device.type == "cpu" for s in optimizers[0].state.values())
    state.onload({"params", "optimizer"})
    assert all(p.device.type == torch.device(DEVICE).type for p in models[0].parameters())
    for m, o in zip(models, optimizers):
        _step(m, o, seed=2)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)

"""A trainer's state between its device and host memory, for context switching (scheduler/context.py).

Two parts move: "params" (the model's parameters and buffers, FSDP2 shards included, with any gradients) and
"optimizer" (its state: Adam's moments). Offloading also frees the gradients when no streamed update is
accumulating into them. On a CPU device the moves are no-ops (host and device memory are one); with
train.offload (FSDP2 CPUOffloadPolicy) the state lives on the host already and nothing moves either.
"""

from __future__ import annotations

import torch

from m2flow.training.weight_sync import nbytes


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes of a tensor's local data (a DTensor's shard)."""
    return nbytes(t.to_local() if hasattr(t, "to_local") else t)


def optimizer_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Every tensor of the optimizer's state onto `device`, but scalars (Adam's step counters stay where torch keeps
    them)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != torch.device(device):
                state[key] = value.to(device, non_blocking=True)


class TrainerState:
    """The parts of a trainer (an actor, a critic, a frozen reference) that context switching moves: see the module
    doc."""

    def __init__(self, model: torch.nn.Module, device, optimizer: torch.optim.Optimizer | None = None,
                 host_resident: bool = False, accumulating=lambda: False):
        """`device`: where it computes; `host_resident`: its state lives on the host whatever happens
        (train.offload): nothing to move; `accumulating()`: whether a streamed update is summing gradients now
        (they are kept, and move with the parameters)."""
        self.model, self.device, self.optimizer, self.accumulating = model, torch.device(device), optimizer, accumulating
        self.host_resident = host_resident  # (then none of it is on the device)
        self.moves = not host_resident and self.device.type != "cpu"

    def part_bytes(self) -> dict[str, float]:
        params = sum(tensor_bytes(p) + (tensor_bytes(p.grad) if p.grad is not None else 0)
                     for p in self.model.parameters()) + sum(tensor_bytes(b) for b in self.model.buffers())
        out = {"params": float(params)}
        if self.optimizer is not None:
            out["optimizer"] = float(sum(tensor_bytes(t) for t in optimizer_tensors(self.optimizer)))
        return {part: 0.0 for part in out} if self.host_resident else out

    def onload(self, parts: set[str]) -> None:
        self._move(parts, self.device)

    def offload(self, parts: set[str]) -> None:
        if "params" in parts and self.optimizer is not None and not self.accumulating():
            self.optimizer.zero_grad(set_to_none=True)  # the gradients are spent: freed, not moved
        self._move(parts, torch.device("cpu"))

    def _move(self, parts: set[str], device: torch.device) -> None:
        if not self.moves:
            return
        if "params" in parts:
            self.model.to(device)
        if "optimizer" in parts and self.optimizer is not None:
            move_optimizer_state(self.optimizer, device)
        if device.type == "cpu":
            torch.cuda.empty_cache()

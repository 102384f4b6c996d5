"""Context switching (issue 15, scheduler/context.py): the per-device lock (groups take turns, a group's ranks
share a turn, a rank takes all its devices or none), the memory ledger (a device over its budget fails naming every
holder), `Switch` (lock, onload, body, offload, unlock, in that order, and what it records), and the state that
moves: a trainer's parameters, gradients and optimizer state (training/offload.py) and the engine's weights and KV
cache (the engine's parts: tests/rollout/test_rollout_engine.py)."""

from __future__ import annotations

import asyncio
import sys

import pytest
import ray
import torch

from m2flow.scheduler.context import (
    GiB,
    DeviceBudgetError,
    DeviceLockTimeout,
    DeviceTable,
    Switch,
    SwitchSpec,
    _Table,
    switch_specs,
)
from m2flow.timeline import Recorder
from m2flow.training.offload import TrainerState, move_optimizer_state, tensor_bytes


def run_async(coro):
    return asyncio.run(coro)


# -- the lock --------------------------------------------------------------------------------------------------------

def test_groups_take_turns_and_a_groups_ranks_share_one():
    async def scenario():
        table, order = _Table(None), []

        async def phase(group: str, name: str, devices: list[int], hold_s: float):
            await table.acquire(devices, group, 5.0)
            order.append(f"{name} in")
            await asyncio.sleep(hold_s)
            order.append(f"{name} out")
            await table.release(devices, group)

        first = asyncio.create_task(phase("actor", "actor0", [0, 1], 0.05))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, phase("actor", "actor1", [0, 1], 0.01),  # the same group: in at once
                             phase("rollout", "rollout0", [0, 1], 0.0))  # another group: waits for both ranks
        return order

    order = run_async(scenario())
    assert order.index("actor1 in") < order.index("actor0 out")  # the group's ranks were in together
    assert order.index("rollout0 in") > max(order.index("actor0 out"), order.index("actor1 out"))


def test_a_rank_takes_all_its_devices_or_none():
    """Group A wants devices {0, 1} while B holds 1: A must not sit on 0 meanwhile, or B's rank on device 0 (whose
    collective partner holds 1) would wait for A forever."""
    async def scenario():
        table = _Table(None)
        await table.acquire([1], "b", 1.0)  # B's rank 1
        a = asyncio.create_task(table.acquire([0, 1], "a", 5.0))
        await asyncio.sleep(0.02)
        waited = await table.acquire([0], "b", 0.2)  # B's rank 0 gets device 0: A took nothing
        assert not a.done()
        await table.release([0], "b")
        await table.release([1], "b")
        await asyncio.wait_for(a, 1.0)
        return waited, table.holder

    waited, holder = run_async(scenario())
    assert waited < 0.1 and holder == {0: ("a", 1), 1: ("a", 1)}


def test_a_wait_past_the_timeout_names_the_holder():
    async def scenario():
        table = _Table(None)
        await table.acquire([0], "rollout", 1.0)
        await table.acquire([0], "actor", 0.05)

    with pytest.raises(DeviceLockTimeout, match=r"actor waited 0.05 s for devices 0, held by rollout \(device 0\)"):
        run_async(scenario())


def test_only_the_holder_releases():
    async def scenario():
        table = _Table(None)
        await table.acquire([0], "rollout", 1.0)
        await table.release([0], "actor")

    with pytest.raises(RuntimeError, match="actor released device 0, which rollout holds"):
        run_async(scenario())


# -- the ledger ------------------------------------------------------------------------------------------------------

def test_ledger_sums_what_ranks_keep_and_fails_over_the_budget():
    table = _Table(budget_bytes=1.0 * GiB)
    assert table.record([0], "rollout rank 0", 0.25 * GiB, "generate", None) is None
    assert table.record([0, 1], "actor rank 0", 1.0 * GiB, "update", None) is None  # half on each device
    assert table.resident_now() == {0: {"rollout rank 0": 0.25 * GiB, "actor rank 0": 0.5 * GiB},
                                    1: {"actor rank 0": 0.5 * GiB}}
    table.record([0], "rollout rank 0", 0.0, "generate", None)  # it offloaded
    assert table.drain_peaks() == {0: 0.75 * GiB, 1: 0.5 * GiB}
    assert table.drain_peaks() == {0: 0.5 * GiB, 1: 0.5 * GiB}  # a new window starts from what is kept now
    msg = table.record([0], "reference rank 0", 0.625 * GiB, "logprobs", None)
    assert "device 0: after reference rank 0's logprobs, its ranks keep 1.12 GiB, over its budget of 1.00 GiB" in msg
    assert "reference rank 0 0.62 GiB, actor rank 0 0.50 GiB" in msg and "cluster.context_switch" in msg


def test_ledger_budget_is_the_smaller_of_the_configured_one_and_the_device():
    table = _Table(budget_bytes=None)
    assert table.record([0], "a", 10.0 * GiB, "x", None) is None  # no budget at all
    assert "over its budget of 8.00 GiB" in table.record([0], "b", 1.0 * GiB, "y", 8.0 * GiB)  # a GPU's memory
    assert _Table(budget_bytes=2.0 * GiB).record([0], "a", 2.0 * GiB, "x", 8.0 * GiB) is None  # equal is fine


def test_the_rollout_and_trainers_take_turns_where_their_devices_overlap():
    table = object()  # (not called)
    hybrid = switch_specs(table, {"rollout": (0,), "actor": (1,), "reference": (0,)}, context_switch=True)
    assert {g: (s.side, s.shared) for g, s in hybrid.items()} == {
        "rollout": ("rollout", True), "actor": ("training", False), "reference": ("training", True)}
    # disaggregated: the actor and the reference share device 1, but no rollout is there: both stay resident
    apart = switch_specs(table, {"rollout": (0,), "actor": (1,), "reference": (1,)}, context_switch=True)
    assert not any(s.shared for s in apart.values())
    off = switch_specs(table, {"rollout": (0, 1), "actor": (0, 1)}, context_switch=False)
    assert not any(s.shared for s in off.values())


# -- Switch, on a real table ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    from m2flow.config import ClusterConfig
    from m2flow.scheduler.cluster import start_ray, stop_ray

    started = not ray.is_initialized()
    start_ray(ClusterConfig(num_cpus=2))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    if started:
        stop_ray()


class FakeState:
    """Two parts of known size, and a log of what moved."""

    def __init__(self):
        self.log: list[str] = []
        self.sizes = {"weights": 100.0, "kv_cache": 50.0}

    def part_bytes(self):
        return dict(self.sizes)

    def onload(self, parts):
        self.log.append("onload " + ",".join(sorted(parts)))

    def offload(self, parts):
        self.log.append("offload " + ",".join(sorted(parts)))


def test_switch_onloads_for_the_phase_and_offloads_after(local_ray):
    table = DeviceTable("switch-test")
    state, recorder = FakeState(), Recorder("rollout")
    switch = Switch(SwitchSpec(table, "rollout", (0,), shared=True), "rollout rank 0", state, recorder, "0")
    assert state.log == ["offload kv_cache,weights"] and table.resident() == {0: {"rollout rank 0": 0.0}}
    assert recorder.drain() == []  # (its start is not a phase on the timeline)
    with switch.phase("weight_sync", {"weights"}):
        state.log.append("body")
        assert table.resident() == {0: {"rollout rank 0": 100.0}}  # only what the phase brought
        with switch.phase("nested", {"weights"}):  # a phase inside a phase shares its turn
            pass
    assert state.log[1:] == ["onload weights", "body", "offload weights"]
    assert table.resident() == {0: {"rollout rank 0": 0.0}}
    assert table.drain_peaks() == {0: 100.0}
    assert [s.stage for s in recorder.drain()] == ["onload", "offload"]
    # the lock is free again: another group gets it at once
    assert ray.get(table.actor.acquire.remote([0], "actor", 1.0)) < 0.5


def test_switch_on_devices_of_its_own_moves_nothing_and_records_all(local_ray):
    table = DeviceTable("own-devices")
    state = FakeState()
    switch = Switch(SwitchSpec(table, "rollout", (0,), shared=False), "rollout rank 0", state, Recorder("rollout"), "0")
    with switch.phase("generate", {"weights", "kv_cache"}):
        state.sizes["kv_cache"] = 70.0
    assert state.log == []
    assert table.resident() == {0: {"rollout rank 0": 170.0}}
    ray.get(table.actor.acquire.remote([0], "reference", 1.0))  # it never took the lock


def test_switch_raises_a_phase_over_the_budget_in_the_rank(local_ray):
    table = DeviceTable("budget", budget_gb=120 / GiB)
    state = FakeState()
    switch = Switch(SwitchSpec(table, "rollout", (0,), shared=True), "rollout rank 0", state, Recorder("rollout"), "0")
    with switch.phase("weight_sync", {"weights"}):  # 100 bytes: within
        pass
    with pytest.raises(DeviceBudgetError, match=r"device 0: after rollout rank 0's generate, its ranks keep 0.00 MiB"):
        with switch.phase("generate", {"weights", "kv_cache"}):  # 150 bytes
            pass
    assert state.log[-1] == "offload kv_cache,weights"  # and it still offloaded and unlocked
    assert ray.get(table.actor.acquire.remote([0], "actor", 1.0)) < 0.5


def test_switch_offloads_and_unlocks_when_the_phase_raises(local_ray):
    table = DeviceTable("raising")
    state = FakeState()
    switch = Switch(SwitchSpec(table, "actor", (0,), shared=True), "actor rank 0", state, Recorder("actor"), "0")
    with pytest.raises(ValueError):
        with switch.phase("update", {"weights"}):
            raise ValueError("boom")
    assert state.log[-1] == "offload weights"
    assert ray.get(table.actor.acquire.remote([0], "rollout", 1.0)) < 0.5


# -- what moves --------------------------------------------------------------------------------------------------

def _trained(make_micro_model):
    model = make_micro_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def test_trainer_state_counts_params_gradients_and_optimizer_state(make_micro_model):
    model, optimizer = _trained(make_micro_model)
    params = sum(p.numel() for p in model.parameters()) * 4
    tensors = len(list(model.parameters()))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    state = TrainerState(model, "cpu", optimizer, accumulating=lambda: False)
    # float32 parameters and their gradients; Adam: two moments per parameter and a 0-dim step per tensor
    assert state.part_bytes() == {"params": float(2 * params + buffers), "optimizer": float(2 * params + 4 * tensors)}
    state.offload({"params", "optimizer"})  # spent gradients are freed, not moved
    assert all(p.grad is None for p in model.parameters())
    assert state.part_bytes()["params"] == params + buffers
    assert TrainerState(model, "cpu", optimizer, host_resident=True).part_bytes() == {"params": 0.0, "optimizer": 0.0}


def test_trainer_state_keeps_gradients_an_update_is_accumulating(make_micro_model):
    model, optimizer = _trained(make_micro_model)
    TrainerState(model, "cpu", optimizer, accumulating=lambda: True).offload({"params"})
    assert all(p.grad is not None for p in model.parameters())


def test_optimizer_state_moves_but_its_step_counters_stay(make_micro_model):
    model, optimizer = _trained(make_micro_model)
    move_optimizer_state(optimizer, "meta")  # (a second device on any machine)
    for state in optimizer.state.values():
        assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu"
    assert tensor_bytes(torch.zeros(3, 4)) == 48

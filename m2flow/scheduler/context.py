"""Context switching: worker groups that share devices take turns on them, and a ledger of what each keeps there.

Where a placement puts the rollout and training groups (actor, reference, critic) on the same devices (every
device, collocated; the shared part of a hybrid), every phase a group runs there (a generation, a logprob pass, an
update, a weight gather or load, a checkpoint) is bracketed by `Switch.phase`:

  1. take the lock of the group's devices (`DeviceTable.acquire`) for its side: the rollout's or the training
     groups' turn, one side at a time on a device. The ranks of every group on one side share the turn (a group's
     ranks meet in collectives; training groups run a step's training phases together, as one worker would), and
     a rank takes all its group's devices at once or none, so two sides never hold half of each other's;
  2. onload what the phase needs (the engine: its weights and KV cache; a trainer: its parameters and, for an
     update, its optimizer state);
  3. run;
  4. offload everything to host memory (gradients freed, the KV cache freed) and release the lock.

A group whose devices no group of the other side uses (disaggregated: the actor and reference together on devices
of their own) keeps its state where it is and takes no lock.

The table also keeps the **ledger**: after every onload and offload each rank records the bytes it keeps on its
devices. A device whose ranks together keep more than its budget (cluster.device_memory_gb; on a GPU at most its
memory) fails that phase with every holder named: a group that did not offload is caught where it happened, not
as an out-of-memory error in some later kernel. Bytes are counted from each worker's tensors and where its
bookkeeping keeps them: on a GPU those are its allocations; on CPU devices, where host and device memory are the
same RAM, the moves change nothing and the ledger is the accounting that shows the turns were taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

import ray

from m2flow.scheduler.devices import device_label, parse_devices

GiB = 2**30


def size(nbytes: float) -> str:
    """Bytes for a person: '1.25 GiB', '0.41 MiB'."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.2f} MiB"
LOCK_TIMEOUT_S = 3600.0  # a phase waits this long for a device before it fails (naming who holds it)


class DeviceBudgetError(RuntimeError):
    """The ranks on a device keep more than its budget: a group that shares it did not offload."""


class DeviceLockTimeout(TimeoutError):
    """A phase waited longer than LOCK_TIMEOUT_S for its devices."""


class _Table:
    """The table's actor (async: waiting acquires do not block the other calls)."""

    def __init__(self, budget_bytes: float | None):
        self.budget = budget_bytes
        self.holder: dict[int, tuple[str, int]] = {}  # device -> (side, its ranks holding it)
        self.resident: dict[int, dict[str, float]] = {}  # device -> {owner: bytes kept there}
        self.peak: dict[int, float] = {}  # device -> the most kept there at once, since the last drain
        self.changed = asyncio.Condition()

    async def acquire(self, devices: list[int], side: str, timeout_s: float) -> float:
        """Waits until none of `devices` is held by another side, then takes them all; the seconds it waited."""
        began = time.monotonic()
        free = lambda: all(self.holder.get(d, (side, 0))[0] == side for d in devices)  # noqa: E731
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(free), timeout_s)
            except asyncio.TimeoutError:
                held = {d: self.holder[d][0] for d in devices if d in self.holder}
                raise DeviceLockTimeout(f"{side} waited {timeout_s:g} s for devices {device_label(devices)}, held by "
                                        + ", ".join(f"{g} (device {d})" for d, g in held.items())) from None
            for d in devices:
                self.holder[d] = (side, self.holder.get(d, (side, 0))[1] + 1)
        return time.monotonic() - began

    async def release(self, devices: list[int], side: str) -> None:
        async with self.changed:
            for d in devices:
                held_by, count = self.holder.get(d, (None, 0))
                if held_by != side:
                    raise RuntimeError(f"{side} released device {d}, which {held_by or 'nobody'} holds")
                if count > 1:
                    self.holder[d] = (side, count - 1)
                else:
                    del self.holder[d]
            self.changed.notify_all()

    def record(self, devices: list[int], owner: str, nbytes: float, phase: str,
               capacity: float | None) -> str | None:
        """`owner` keeps `nbytes` on `devices` (shared evenly among them) after `phase`. Returns the error of a
        device whose ranks then keep more than its budget (the configured one, else `capacity`), else None (the
        rank raises it as its own DeviceBudgetError)."""
        error = None
        for d in devices:
            on = self.resident.setdefault(d, {})
            on[owner] = nbytes / len(devices)
            total = sum(on.values())
            self.peak[d] = max(self.peak.get(d, 0.0), total)
            budget = min((b for b in (self.budget, capacity) if b is not None), default=None)
            if budget is not None and total > budget and error is None:
                holders = ", ".join(f"{o} {size(b)}" for o, b in sorted(on.items(), key=lambda x: -x[1]) if b)
                error = (f"device {d}: after {owner}'s {phase}, its ranks keep {size(total)}, over its budget of "
                         f"{size(budget)} ({holders}): a group sharing the device kept its state there "
                         f"(cluster.context_switch=true makes each offload after its phase; or give the groups "
                         f"devices of their own, or raise cluster.device_memory_gb)")
        return error

    def drain_peaks(self) -> dict[int, float]:
        """Each device's peak since the last call (starting from what is kept there now)."""
        peaks = dict(self.peak)
        self.peak = {d: sum(on.values()) for d, on in self.resident.items()}
        return peaks

    def resident_now(self) -> dict[int, dict[str, float]]:
        return {d: dict(on) for d, on in self.resident.items()}


class DeviceTable:
    """A handle on the run's device table (locks and ledger); picklable, so every worker can hold it."""

    def __init__(self, name: str, budget_gb: float | None = None):
        actor = ray.remote(num_cpus=0, max_concurrency=1000)(_Table)
        self.actor = actor.options(name=f"devices-{name}-{time.time_ns()}").remote(
            None if budget_gb is None else budget_gb * GiB)

    def drain_peaks(self) -> dict[int, float]:
        """Each device's most bytes kept at once since the last call."""
        return ray.get(self.actor.drain_peaks.remote())

    def resident(self) -> dict[int, dict[str, float]]:
        """What each rank keeps on each device now: {device: {owner: bytes}}."""
        return ray.get(self.actor.resident_now.remote())

    def metrics(self) -> dict[str, float]:
        """memory/device<d>_ledger_gb: each device's most GiB kept at once since the last call."""
        return {f"memory/device{d}_ledger_gb": b / GiB for d, b in sorted(self.drain_peaks().items())}


class Offloadable(Protocol):
    """A worker's state, in named parts (e.g. "params", "optimizer"; "weights", "kv_cache") that move together."""

    def part_bytes(self) -> dict[str, float]:
        """Bytes of each part (those that exist now)."""

    def onload(self, parts: set[str]) -> None:
        """Brings `parts` onto the compute device."""

    def offload(self, parts: set[str]) -> None:
        """Moves `parts` to host memory (or frees what is re-made on onload: gradients, a KV cache)."""


@dataclass(frozen=True)
class SwitchSpec:
    """What a rank needs to take its turns: the run's table, its side, its group's devices, and whether it shares
    them with the other side (only then does it lock and offload)."""

    table: DeviceTable
    side: str  # "rollout" or "training": the lock's owner (every rank of every group on one side shares a turn)
    devices: tuple[int, ...]  # its group's devices (a rank locks all of them, so its group mates never wait on it)
    shared: bool  # a group of the other side runs on these devices and cluster.context_switch is on


def side(group: str) -> str:
    """Which side of the context switch a group is on: the rollout's, or the training groups' (actor, reference,
    critic: they run the training phases of a step together, as one worker would)."""
    return "rollout" if group == "rollout" else "training"


def switch_specs(table: DeviceTable, devices: dict[str, tuple[int, ...]], context_switch: bool) -> dict[str, SwitchSpec]:
    """Each group's SwitchSpec, from the devices each runs on: it shares them when a group of the other side runs
    on some of them (a rollout and a trainer take turns; an actor and a reference on the same devices stay resident
    together and may run at once)."""
    return {group: SwitchSpec(table, side(group), d, context_switch and any(
        set(d) & set(other) for g, other in devices.items() if side(g) != side(group)))
            for group, d in devices.items()}


class Switch:
    """One rank's turns on its devices (see the module doc): `with switch.phase("update", {"params", "optimizer"}):`."""

    def __init__(self, spec: SwitchSpec | None, owner: str, state: Offloadable, recorder, rank_devices: str,
                 capacity: float | None = None):
        """`owner`: this rank in the ledger (e.g. "actor rank 0"); `rank_devices`: the devices its own state lives
        on ("0" or "0-1"); `capacity`: its device's memory (a GPU's), a budget the ledger applies besides the
        configured one."""
        self.spec, self.owner, self.state, self.recorder, self.capacity = spec, owner, state, recorder, capacity
        self.devices = parse_devices(rank_devices) or (list(spec.devices) if spec else [])
        self.loaded = set(state.part_bytes())  # a worker starts with everything on its device
        self.enabled = spec is not None and spec.shared
        self.depth = 0  # nested phases (a checkpoint's save inside nothing else; a phase calling another) share one turn
        if self.enabled:  # it waits, offloaded, for its first phase
            self.state.offload(set(self.loaded))
            self.loaded = set()
        # (a device over its budget already fails the first phase on it, naming every group's ranks, once all have
        # started: a worker failing to start would name only those before it)
        self._record("start", check=False)

    @contextlib.contextmanager
    def phase(self, name: str, parts: set[str]):
        """Runs the body with `parts` on the device: lock, onload, body, offload, unlock (when the devices are
        shared); otherwise only records what the rank keeps there."""
        if not self.enabled or self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            if not self.depth:  # (after the body succeeded: a budget error never hides the body's own)
                self._record(name)
            return
        spec = self.spec
        waited = ray.get(spec.table.actor.acquire.remote(list(spec.devices), spec.side, LOCK_TIMEOUT_S))
        self.depth += 1
        try:
            with self.recorder.span("onload", parts=",".join(sorted(parts)), waited_s=round(waited, 4)):
                self.state.onload(parts - self.loaded)
                self.loaded |= parts
            self._record(name)
            yield
            self._record(name)  # state made during the phase (Adam's moments at a first step) counts too
        finally:
            self.depth -= 1
            try:
                self._offload(name)
            finally:
                ray.get(spec.table.actor.release.remote(list(spec.devices), spec.side))

    def _offload(self, name: str) -> None:
        with self.recorder.span("offload", parts=",".join(sorted(self.loaded))):
            self.state.offload(set(self.loaded))
            self.loaded = set()
        self._record(name, check=False)  # (it only lowers what the device holds)

    def resident_bytes(self) -> float:
        """What this rank keeps on its device now: the bytes of its parts there."""
        return float(sum(b for part, b in self.state.part_bytes().items() if part in self.loaded))

    def _record(self, phase: str, check: bool = True) -> None:
        if self.spec is None:
            return
        error = ray.get(self.spec.table.actor.record.remote(self.devices, self.owner, self.resident_bytes(), phase,
                                                            self.capacity))
        if error and check:
            raise DeviceBudgetError(error)

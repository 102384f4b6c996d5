"""Placement specs in RLinf's syntax: which devices each role's worker group runs on, and the mode that follows.

A spec maps comma-separated roles to device sets: `{"actor,rollout,reward": "all"}` (collocated),
`{"rollout": "0-3", "inference": "4-5", "actor": "6-7"}` (disaggregated), or a mix (hybrid). A device set is
"all", one index ("3"), a range ("0-3"), or several of those joined by commas inside the value ("0-1,4").

Roles left out follow the others: `inference` (old and reference logprobs) and `critic` run on the actor's
devices, `reward` on all of them. The mode is derived from the sets: every role on the same devices is
collocated; a rollout on devices of its own (the training roles elsewhere, equal or disjoint among themselves) is
disaggregated; a rollout sharing its devices with some training roles but not all is hybrid. Two roles whose
sets overlap without being equal cannot be scheduled (neither stage order nor streaming fits), and neither can
a role without devices, an index past the cluster's devices, or a role named twice: each is one PlacementError
naming the role and the valid choices, before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from m2flow.scheduler.devices import device_label

ROLES = ("rollout", "reward", "inference", "actor", "critic")


class PlacementError(ValueError):
    """A placement spec that cannot run on this cluster."""


@dataclass(frozen=True)
class PlacementPlan:
    devices: dict[str, tuple[int, ...]]  # role -> its device indices, ascending
    mode: str  # collocated | disaggregated | hybrid

    def describe(self) -> str:
        """One line per role, e.g. 'rollout: devices 0-3'."""
        return "; ".join(f"{role}: devices {device_label(d)}" for role, d in self.devices.items()) + f" ({self.mode})"


def plan_placement(spec: dict[str, str], num_devices: int) -> PlacementPlan:
    """The device set of every role and the mode for `spec` on a cluster of `num_devices` devices."""
    devices: dict[str, tuple[int, ...]] = {}
    for roles, value in spec.items():
        sets = _parse_devices(str(value), num_devices, roles)
        for role in (r.strip() for r in str(roles).split(",")):
            if role not in ROLES:
                raise PlacementError(f"cluster.placement: unknown role {role!r}; roles: {', '.join(ROLES)}")
            if role in devices:
                raise PlacementError(f"cluster.placement: role {role!r} is given devices twice")
            devices[role] = sets
    for role in ("rollout", "actor"):
        if role not in devices:
            raise PlacementError(f"cluster.placement: role {role!r} has no devices; every run needs rollout and "
                                 f"actor (e.g. {{'actor,rollout,reward': 'all'}})")
    devices.setdefault("inference", devices["actor"])
    devices.setdefault("critic", devices["actor"])
    devices.setdefault("reward", tuple(range(num_devices)))
    devices = {role: devices[role] for role in ROLES}
    compute = {r: set(d) for r, d in devices.items() if r != "reward"}  # reward scores text: it fits anywhere
    names = list(compute)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if compute[a] & compute[b] and compute[a] != compute[b]:
                raise PlacementError(f"cluster.placement: {a} (devices {device_label(devices[a])}) and {b} (devices "
                                     f"{device_label(devices[b])}) overlap without sharing the same devices: give them "
                                     f"the same devices (collocated) or disjoint ones (disaggregated)")
    shared_with_rollout = [r for r in names if r != "rollout" and compute[r] & compute["rollout"]]
    mode = ("collocated" if len({frozenset(d) for d in compute.values()}) == 1
            else "disaggregated" if not shared_with_rollout else "hybrid")
    return PlacementPlan(devices, mode)


def _parse_devices(value: str, num_devices: int, roles: str) -> tuple[int, ...]:
    if value.strip() == "all":
        return tuple(range(num_devices))
    out: set[int] = set()
    for part in value.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise PlacementError(f"cluster.placement: {roles!r}: {value!r} is not a device set ('all', '3', '0-3', "
                                 f"'0-1,4')") from None
        if not 0 <= first <= last < num_devices:
            raise PlacementError(f"cluster.placement: {roles!r}: devices {value!r} are not within the cluster's "
                                 f"{num_devices} devices (0-{num_devices - 1})")
        out.update(range(first, last + 1))
    return tuple(sorted(out))


def resolve_placement(placement, num_devices: int) -> PlacementPlan:
    """cluster.placement on a cluster of `num_devices` devices: "collocated" (every role on every device),
    "disaggregated" (the rollout on the first half of the devices, the training roles on the others) or a spec."""
    if placement == "collocated":
        return plan_placement({"actor,rollout,reward": "all"}, num_devices)
    if placement == "disaggregated":
        if num_devices < 2:
            raise PlacementError(f"cluster.placement=disaggregated needs at least 2 devices (cluster.devices), "
                                 f"this run has {num_devices}")
        half = num_devices // 2
        return plan_placement({"rollout": f"0-{half - 1}", "actor": f"{half}-{num_devices - 1}"}, num_devices)
    return plan_placement(dict(placement), num_devices)

"""Channels: bounded FIFO queues of weighted items between worker groups, on any node.

A channel is an async Ray actor that holds object references, never payloads: `put` stores the item in the
object store (on the producer's node) and hands the channel only its reference; `get` / `get_batch` receive
references and fetch the items straight from where they live. So a micro-batch crosses the cluster once, from
producer to consumer, whatever the channel's node.

- `put(item, weight)`: blocks while the channel holds `capacity` items (back-pressure on a producer that runs
  ahead), then appends. The weight is what consumers batch by (e.g. a micro-batch's tokens).
- `get()`: the oldest item, blocking until there is one.
- `get_batch(target_weight, max_items)`: the oldest items, as many as make up `target_weight` (at least one),
  at most `max_items`; blocks until the queue holds that much weight or that many items.
- Every blocking call raises ChannelTimeout after `timeout_s` (naming the channel and what it holds): a stage
  that stops producing makes its consumers fail loudly instead of hanging.

Consumers stop by quota, not by end-of-stream markers: each knows how many items (or how much weight) it will
receive in an iteration and asks for exactly that.
"""

from __future__ import annotations

import asyncio
import collections
import time

import ray


class ChannelTimeout(TimeoutError):
    """A channel call waited longer than the channel's timeout."""


class _Queue:
    """The channel's actor (async: its waiting calls do not block each other)."""

    def __init__(self, name: str, capacity: int):
        self.name, self.capacity = name, capacity
        self.items: collections.deque = collections.deque()  # (ref, weight), oldest first
        self.weight = 0.0  # of the queued items
        self.puts = self.gets = 0  # items ever put / taken
        self.changed = asyncio.Condition()

    async def _wait(self, ready, timeout_s: float, what: str) -> None:
        try:
            await asyncio.wait_for(self.changed.wait_for(ready), timeout_s)
        except asyncio.TimeoutError:
            raise ChannelTimeout(f"channel {self.name!r}: waited {timeout_s:g} s {what}; it holds {len(self.items)} "
                                 f"item(s) of weight {self.weight:g} ({self.puts} put, {self.gets} taken so far)") from None

    async def put(self, refs: list, weight: float, timeout_s: float) -> None:
        async with self.changed:
            await self._wait(lambda: len(self.items) < self.capacity, timeout_s,
                             f"for room to put an item (capacity {self.capacity})")
            self.items.append((refs[0], weight))
            self.weight += weight
            self.puts += 1
            self.changed.notify_all()

    async def get_batch(self, target_weight: float, max_items: int, timeout_s: float) -> list:
        """[(ref, weight)]: the oldest items until their weight reaches target_weight (at least one), at most
        max_items."""
        async with self.changed:
            await self._wait(lambda: len(self.items) >= max_items or (self.items and self.weight >= target_weight),
                             timeout_s, f"for items of weight {target_weight:g} (or {max_items} items)")
            out, total = [], 0.0
            while self.items and len(out) < max_items and (not out or total < target_weight):
                ref, weight = self.items.popleft()
                out.append(([ref], weight))  # the reference in a list: Ray passes it back unresolved
                total += weight
                self.weight -= weight
            self.gets += len(out)
            self.changed.notify_all()
            return out

    def stats(self) -> dict:
        return {"queued": len(self.items), "weight": self.weight, "puts": self.puts, "gets": self.gets}


class Channel:
    """A handle on a channel; picklable, so workers of any group (and node) can hold it."""

    def __init__(self, name: str, capacity: int = 64, timeout_s: float = 600.0):
        if capacity < 1:
            raise ValueError(f"a channel needs a capacity of at least 1 item, got {capacity}")
        self.name, self.timeout_s = name, timeout_s
        # async actor, no CPU reserved: it only moves references; many calls may wait on it at once
        queue = ray.remote(num_cpus=0, max_concurrency=1000)(_Queue)
        self.queue = queue.options(name=f"channel-{name}-{time.time_ns()}").remote(name, capacity)

    def put(self, item, weight: float = 1.0) -> None:
        """Stores `item` in the object store and queues its reference (blocks while the channel is full)."""
        ray.get(self.queue.put.remote([ray.put(item)], float(weight), self.timeout_s))

    def get(self):
        """The oldest item (blocks until there is one)."""
        return self.get_batch(0.0, 1)[0]

    def get_batch(self, target_weight: float, max_items: int = 1 << 30, producers: list | None = None) -> list:
        """The oldest items whose weights add up to `target_weight` (at least one item), at most `max_items`.
        `producers`: the ObjectRefs of the calls that put into this channel; while waiting, one that fails raises
        its error here at once (a producer that died puts nothing more: waiting for the timeout would only hang); the
        waiting get is cancelled, and a get cancelled after it took items loses them: a consumer that lost a producer
        is expected to stop, not to read on."""
        taking = self.queue.get_batch.remote(float(target_weight), max_items, self.timeout_s)
        watched = list(producers or [])
        while True:
            ready, _ = ray.wait([taking, *watched], num_returns=1)
            if taking in ready:
                break
            try:
                ray.get(ready)  # a finished producer: raises its error if it failed
            except BaseException:
                ray.cancel(taking)  # the waiting get must not take later items for nobody
                raise
            watched = [p for p in watched if p not in ready]
        return ray.get([refs[0] for refs, _ in ray.get(taking)])

    def stats(self) -> dict:
        """{queued, weight, puts, gets}: what the channel holds and has moved."""
        return ray.get(self.queue.stats.remote())

    def close(self) -> None:
        ray.kill(self.queue)

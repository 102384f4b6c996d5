"""Channels (issue 15): FIFO, weighted batches, exactly-once delivery with several producers and consumers,
blocking and waking, back-pressure, and timeouts that raise instead of hanging."""

from __future__ import annotations

import sys

import pytest
import ray

from m2flow.scheduler.channel import Channel, ChannelTimeout


@pytest.fixture(scope="module")
def local_ray():
    from m2flow.config import ClusterConfig
    from m2flow.scheduler.cluster import start_ray, stop_ray

    started = not ray.is_initialized()
    start_ray(ClusterConfig(num_cpus=2))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    yield
    if started:
        stop_ray()


def test_fifo_and_batches_by_weight(local_ray):
    ch = Channel("fifo")
    for i, w in enumerate([3, 1, 4, 1, 5]):
        ch.put({"item": i}, weight=w)
    assert ch.stats() == {"queued": 5, "weight": 14.0, "puts": 5, "gets": 0}
    assert ch.get() == {"item": 0}
    assert ch.get_batch(target_weight=5) == [{"item": 1}, {"item": 2}]  # 1 + 4 reaches 5
    assert ch.get_batch(target_weight=100, max_items=1) == [{"item": 3}]  # at most max_items
    assert ch.get_batch(target_weight=0.5) == [{"item": 4}]  # at least one item
    assert ch.stats() == {"queued": 0, "weight": 0.0, "puts": 5, "gets": 5}
    ch.close()


@ray.remote(num_cpus=0)
def _produce(ch: Channel, producer: int, count: int) -> None:
    for i in range(count):
        ch.put((producer, i), weight=1 + i % 3)


@ray.remote(num_cpus=0)
def _consume(ch: Channel, quota: int) -> list:
    got = []
    while len(got) < quota:  # a consumer stops by quota: it knows how many items it will receive
        got += ch.get_batch(target_weight=4, max_items=quota - len(got))
    return got


def test_every_item_reaches_exactly_one_consumer(local_ray):
    ch = Channel("many", capacity=4, timeout_s=60)  # small: producers wait on consumers (back-pressure)
    producers = [_produce.remote(ch, p, 20) for p in range(3)]
    consumers = [_consume.remote(ch, q) for q in (25, 35)]
    ray.get(producers)
    got = ray.get(consumers)
    assert [len(g) for g in got] == [25, 35]
    items = got[0] + got[1]
    assert sorted(items) == sorted((p, i) for p in range(3) for i in range(20))  # each once, none lost
    for p in range(3):  # each producer's items arrive in its order (per consumer)
        for g in got:
            mine = [i for q, i in g if q == p]
            assert mine == sorted(mine)
    ch.close()


@ray.remote(num_cpus=0)
def _get_one(ch: Channel):
    return ch.get()


def test_a_waiting_consumer_wakes_when_an_item_arrives(local_ray):
    ch = Channel("wake", timeout_s=60)
    waiting = _get_one.remote(ch)
    ready, _ = ray.wait([waiting], timeout=1.0)
    assert not ready  # blocked on the empty channel
    ch.put("hello")
    assert ray.get(waiting, timeout=30) == "hello"
    ch.close()


def test_a_full_channel_holds_the_producer_back(local_ray):
    ch = Channel("full", capacity=2, timeout_s=60)
    ch.put("a")
    ch.put("b")
    third = _produce.remote(ch, 9, 1)  # puts (9, 0): must wait for room
    ready, _ = ray.wait([third], timeout=1.0)
    assert not ready and ch.stats()["queued"] == 2
    assert ch.get() == "a"
    ray.get(third, timeout=30)
    assert [ch.get(), ch.get()] == ["b", (9, 0)]
    ch.close()


def test_timeouts_raise_and_name_the_channel(local_ray):
    ch = Channel("stalled", capacity=1, timeout_s=0.5)
    with pytest.raises(ChannelTimeout, match=r"channel 'stalled': waited 0.5 s for items of weight 0 \(or 1 items\); "
                                             r"it holds 0 item\(s\)"):
        ch.get()
    ch.put("x")
    with pytest.raises(ChannelTimeout, match=r"channel 'stalled': waited 0.5 s for room to put an item \(capacity 1\)"):
        ch.put("y")
    assert ch.get() == "x"  # the channel still works after a timeout
    ch.close()
    with pytest.raises(ValueError, match="capacity of at least 1"):
        Channel("bad", capacity=0)


@ray.remote(num_cpus=0)
def _produce_then_fail(ch: Channel) -> None:
    ch.put("first")
    raise ValueError("the producer broke")


def test_a_failing_producer_stops_the_wait_at_once(local_ray):
    """A consumer that names its producers gets a producer's error as soon as it fails, not the channel's timeout
    (600 s here): the items put before the failure are still delivered first."""
    import time

    ch = Channel("failing", timeout_s=600)
    producer = _produce_then_fail.remote(ch)
    assert ch.get_batch(0, 1, producers=[producer]) == ["first"]
    began = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="the producer broke"):
        ch.get_batch(0, 1, producers=[producer])
    assert time.monotonic() - began < 60  # well before the channel's timeout: no hang
    ch.close()  # (the abandoned get is cancelled: the run that lost a producer stops, and so does its channel)
    ch = Channel("finishing", timeout_s=600)
    ok = _produce.remote(ch, 0, 2)  # a producer that finishes without error is waited past, not raised
    assert ch.get_batch(2, 2, producers=[ok]) == [(0, 0), (0, 1)]
    ch.close()

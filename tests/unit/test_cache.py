"""The two-level cache against a real Redis (127.0.0.1:6379, a test-only key prefix, cleaned up)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from router.cache import Breaker, SingleFlight, TwoLevelCache, connect_redis
from router.metrics import RouterMetrics
from router.routing import Prediction

REDIS_URL = "redis://127.0.0.1:6379/0"


def sample(metrics: RouterMetrics, name: str, **labels: str) -> float:
    registry = metrics.registry
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


@pytest.fixture
def metrics() -> RouterMetrics:
    return RouterMetrics(CollectorRegistry())


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"qr-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = connect_redis(REDIS_URL, 1.0)
    keys = [k async for k in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_l1_hit_after_put(metrics: RouterMetrics) -> None:
    cache = TwoLevelCache(metrics, l1_size=10, l1_ttl_sec=60)
    assert await cache.get("k") is None
    cache.put("k", Prediction("0", 0.9))
    assert await cache.get("k") == Prediction("0", 0.9)
    assert sample(metrics, "router_cache_hits_total", level="l1") == 1
    assert sample(metrics, "router_cache_misses_total", level="l1") == 1


async def test_l1_is_bounded_and_expires(metrics: RouterMetrics) -> None:
    cache = TwoLevelCache(metrics, l1_size=2, l1_ttl_sec=0.05)
    for i in range(5):
        cache.put(f"k{i}", Prediction("1", 0.6))
    assert cache.l1 is not None and len(cache.l1) == 2
    await asyncio.sleep(0.1)
    assert cache.get_l1("k4") is None


async def test_l2_hit_fills_l1_of_another_instance(metrics: RouterMetrics, redis_prefix: str) -> None:
    writer = TwoLevelCache(metrics, 10, 60, redis=connect_redis(REDIS_URL, 0.5), key_prefix=redis_prefix)
    reader = TwoLevelCache(metrics, 10, 60, redis=connect_redis(REDIS_URL, 0.5), key_prefix=redis_prefix)
    writer.put("model:abc", Prediction("0", 0.875))  # L2 is written behind...
    await writer.flush()  # ...and this waits for it
    assert reader.get_l1("model:abc") is None
    assert await reader.get("model:abc") == Prediction("0", 0.875)
    assert reader.get_l1("model:abc") == Prediction("0", 0.875)  # filled from L2
    assert sample(metrics, "router_cache_hits_total", level="l2") == 1
    raw = await writer.redis.get(f"{redis_prefix}model:abc")  # type: ignore[union-attr]
    assert raw == '["0", 0.875]'
    ttl = await writer.redis.ttl(f"{redis_prefix}model:abc")  # type: ignore[union-attr]
    assert 3500 < ttl <= 3600
    await writer.close()
    await reader.close()


class CountingRedis(Redis):
    """The real client, counting the commands it sends one by one (a pipeline's go as one `execute`)."""

    commands: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


async def test_the_lookups_of_one_event_loop_turn_go_to_redis_as_one_mget(
    metrics: RouterMetrics, redis_prefix: str
) -> None:
    writer = TwoLevelCache(metrics, 10, 60, redis=connect_redis(REDIS_URL, 0.5), key_prefix=redis_prefix)
    for i in range(0, 20, 2):
        writer.put(f"k{i}", Prediction(str(i % 4 // 2), i / 100))
    await writer.flush()
    await writer.redis.set(f"{redis_prefix}k19", "not json")  # type: ignore[union-attr]
    client = CountingRedis.from_url(REDIS_URL, decode_responses=True)
    client.commands = []
    reader = TwoLevelCache(metrics, 100, 60, redis=client, key_prefix=redis_prefix)
    answers = await asyncio.gather(*(reader.get_l2(f"k{i}") for i in range(20)))
    assert answers == [Prediction(str(i % 4 // 2), i / 100) if i % 2 == 0 else None for i in range(20)]
    assert client.commands == ["MGET"]  # one round trip for twenty lookups; the unreadable entry is a miss
    assert sample(metrics, "router_cache_hits_total", level="l2") == 10
    assert sample(metrics, "router_cache_misses_total", level="l2") == 10
    assert reader.get_l1("k4") == Prediction("0", 0.04)  # hits fill L1
    assert await reader.get_l2("k2") == Prediction("1", 0.02) and client.commands == ["MGET", "MGET"]
    await writer.close()
    await reader.close()


async def test_unreachable_redis_degrades_to_l1_and_opens_the_breaker(metrics: RouterMetrics) -> None:
    cache = TwoLevelCache(
        metrics, 10, 60, redis=connect_redis(f"redis://127.0.0.1:{closed_port()}/0", 0.05), breaker=Breaker(30)
    )
    start = time.perf_counter()
    cache.put("k", Prediction("1", 0.99))
    await cache.flush()  # the write failed, but never raises
    assert await cache.get_l2("other") is None  # breaker open: no second connection attempt
    assert time.perf_counter() - start < 0.5
    assert await cache.get("k") == Prediction("1", 0.99)  # L1 still serves
    assert sample(metrics, "router_redis_errors_total", operation="set") == 1
    assert sample(metrics, "router_redis_errors_total", operation="get") == 0
    assert sample(metrics, "router_redis_up") == 0
    assert await cache.redis_reachable() is False
    await cache.close()


def test_breaker_backs_off_then_lets_one_probe_through() -> None:
    breaker = Breaker(first_backoff_sec=0.05, max_backoff_sec=0.1)
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failure()  # probe failed: open again, back-off doubled
    assert breaker.backoff == 0.1
    time.sleep(0.11)
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow()
    assert breaker.backoff == 0.05


async def test_single_flight_computes_identical_concurrent_misses_once() -> None:
    flights = SingleFlight()
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "answer"

    results = await asyncio.gather(*(flights.run("k", compute) for _ in range(10)), flights.run("other", compute))
    assert results == ["answer"] * 11
    assert calls == 2
    assert flights.running == {}


async def test_single_flight_survives_a_cancelled_caller_and_shares_errors() -> None:
    flights = SingleFlight()
    done = asyncio.Event()

    async def compute() -> str:
        await asyncio.sleep(0.05)
        done.set()
        return "kept"

    leader = asyncio.create_task(flights.run("k", compute))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flights.run("k", compute))
    await asyncio.sleep(0.01)
    leader.cancel()  # the first client went away
    assert await follower == "kept"
    assert done.is_set()

    async def broken() -> str:
        raise RuntimeError("model failed")

    outcomes = await asyncio.gather(flights.run("e", broken), flights.run("e", broken), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_single_flight_cancels_the_computation_when_every_caller_is_gone() -> None:
    flights = SingleFlight()
    started, finished = asyncio.Event(), asyncio.Event()

    async def compute() -> str:
        started.set()
        await asyncio.sleep(0.2)
        finished.set()
        return "nobody reads this"

    callers = [asyncio.create_task(flights.run("k", compute)) for _ in range(3)]
    await started.wait()
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.sleep(0.3)
    assert not finished.is_set()
    assert flights.running == {} and flights.waiters == {}


async def test_a_caller_arriving_after_every_other_left_gets_a_fresh_computation() -> None:
    flights = SingleFlight()

    async def compute() -> str:
        await asyncio.sleep(0.05)
        return "fresh"

    gone = asyncio.create_task(flights.run("k", compute))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0)  # the cancelled computation has not finished yet when the next caller comes
    assert await flights.run("k", compute) == "fresh"

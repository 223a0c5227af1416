"""Two-level prediction cache (L1 in-process, L2 Redis) and single-flight for identical concurrent misses.

It stores the model's raw prediction, never the routed label, so a new CONFIDENCE_THRESHOLD applies at once. Keys
come from `router.text.cache_key` (model identity + text hash). Redis is optional and never fails a request: every
command has a millisecond timeout, and after a failure a breaker skips Redis for a back-off that doubles up to a
minute, then lets a single request probe it.

Redis commands are coalesced per turn of the event loop: the lookups of all requests that reach L2 in one turn go
as one MGET, and answers are written behind, one pipeline per turn, without the request waiting for them. In
bursts of 64 misses a GET and a SET each cost 240-304 us of the event loop's CPU a miss; coalesced, 53-69 us
(docs/performance.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from cachetools import TTLCache

from router.metrics import RouterMetrics
from router.routing import Prediction

log = logging.getLogger(__name__)
T = TypeVar("T")


class Breaker:
    """Circuit breaker for Redis: closed → open (back-off) → one probe → closed or open for longer."""

    def __init__(self, first_backoff_sec: float, max_backoff_sec: float = 60.0) -> None:
        self.first_backoff = first_backoff_sec
        self.max_backoff = max_backoff_sec
        self.backoff = first_backoff_sec
        self.open_until = 0.0
        self.failed = False
        self.probing = False

    def allow(self) -> bool:
        if not self.failed:
            return True
        if self.probing or time.monotonic() < self.open_until:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.failed = self.probing = False
        self.backoff = self.first_backoff

    def failure(self) -> None:
        if self.failed and not self.probing:
            return  # a command that started before the breaker opened; the back-off is already running
        self.open_until = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)
        self.failed, self.probing = True, False


class TwoLevelCache:
    """L1 `cachetools.TTLCache` in front of an optional `redis.asyncio` client."""

    def __init__(
        self,
        metrics: RouterMetrics,
        l1_size: int,
        l1_ttl_sec: float,
        redis: Any | None = None,
        l2_ttl_sec: int = 3600,
        key_prefix: str = "qr:",
        timeout_sec: float = 0.05,
        breaker: Breaker | None = None,
    ) -> None:
        self.metrics = metrics
        self.l1: TTLCache[str, Prediction] | None = TTLCache(l1_size, l1_ttl_sec) if l1_size > 0 else None
        self.redis = redis
        self.l2_ttl_sec = l2_ttl_sec
        self.key_prefix = key_prefix
        self.timeout_sec = timeout_sec
        self.breaker = breaker or Breaker(5.0)
        self.lookups: dict[str, list[asyncio.Future[Prediction | None]]] = {}  # this turn's L2 reads, by key
        self.writes: dict[str, str] = {}  # this turn's L2 writes: Redis key -> value
        self.flushes: set[asyncio.Task[None]] = set()  # the running MGETs and write pipelines
        metrics.redis_up.set(1 if redis is not None else 0)

    def get_l1(self, key: str, count_miss: bool = True) -> Prediction | None:
        """The in-process entry, if any (no I/O: called on every request before anything else). `count_miss=False`
        for a look that another one follows on a miss (the cache-hit path's), so a miss is counted once."""
        if self.l1 is None:
            return None
        hit = self.l1.get(key)
        if hit is None:
            if count_miss:
                self.metrics.cache_misses.labels("l1").inc()
        else:
            self.metrics.cache_hits.labels("l1").inc()
        return hit

    async def get_l2(self, key: str) -> Prediction | None:
        """The Redis entry, if any; a hit fills L1. None when L2 is off, down or misses."""
        if self.redis is None:
            return None
        answer: asyncio.Future[Prediction | None] = asyncio.get_running_loop().create_future()
        if not self.lookups:
            self._start(self._look_up())  # runs next turn, with every lookup queued in this one
        self.lookups.setdefault(key, []).append(answer)
        prediction = await answer
        counter = self.metrics.cache_misses if prediction is None else self.metrics.cache_hits
        counter.labels("l2").inc()
        return prediction

    async def get(self, key: str) -> Prediction | None:
        """L1, then L2; None on a miss of both."""
        return self.get_l1(key) or await self.get_l2(key)

    def put(self, key: str, prediction: Prediction) -> None:
        """Into L1 now; into L2 with this turn's other writes, in the background (`flush` waits for it)."""
        if self.l1 is not None:
            self.l1[key] = prediction
        if self.redis is None:
            return
        if not self.writes:
            self._start(self._write())
        self.writes[self.key_prefix + key] = json.dumps([prediction.label, prediction.confidence])

    async def flush(self) -> None:
        """Wait for the lookups and writes already sent (at shutdown, so no answer is lost on the way)."""
        while self.flushes:
            await asyncio.gather(*self.flushes)

    def _start(self, flush: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(flush)
        self.flushes.add(task)
        task.add_done_callback(self.flushes.discard)

    async def _look_up(self) -> None:
        """One MGET for the keys queued in the turn before; every waiter gets an answer, None if Redis had none."""
        lookups, self.lookups = self.lookups, {}
        found: list[Prediction | None] = [None] * len(lookups)
        try:
            raws = await self._redis_call("get", lambda redis: redis.mget([self.key_prefix + k for k in lookups]))
            if raws is not None:
                found = [self._decode(raw) for raw in raws]
        finally:
            for (key, answers), prediction in zip(lookups.items(), found, strict=True):
                if prediction is not None and self.l1 is not None:
                    self.l1[key] = prediction
                for answer in answers:
                    if not answer.done():  # its caller may have gone
                        answer.set_result(prediction)

    async def _write(self) -> None:
        """One pipeline of SETs with the TTL for the writes queued in the turn before."""
        writes, self.writes = self.writes, {}

        async def set_all(redis: Any) -> Any:
            async with redis.pipeline(transaction=False) as pipe:
                for redis_key, value in writes.items():
                    pipe.set(redis_key, value, ex=self.l2_ttl_sec)
                return await pipe.execute()

        await self._redis_call("set", set_all)

    @staticmethod
    def _decode(raw: str | None) -> Prediction | None:
        """A stored answer; None for no entry or one this code did not write (a miss, not a failed request)."""
        if raw is None:
            return None
        try:
            label, confidence = json.loads(raw)
            return Prediction(str(label), float(confidence))
        except (ValueError, TypeError):
            return None

    async def redis_reachable(self) -> bool | None:
        """PING through the breaker-free path (for /health/deep); None when L2 is not configured."""
        if self.redis is None:
            return None
        try:
            async with asyncio.timeout(self.timeout_sec * 4):
                return bool(await self.redis.ping())
        except Exception:
            return False

    async def _redis_call(self, operation: str, command: Callable[[Any], Awaitable[Any]]) -> Any:
        """`command(redis)` within the timeout, through the breaker; None if skipped or failed (`operation` labels
        the error metric: "get" or "set")."""
        if self.redis is None or not self.breaker.allow():
            return None
        try:
            async with asyncio.timeout(self.timeout_sec):
                result = await command(self.redis)
        except Exception as exc:  # timeouts, refused connections, server errors: all mean "skip L2 for now"
            self.metrics.redis_errors.labels(operation).inc()
            if not self.breaker.failed or self.breaker.probing:
                log.warning(
                    "redis %s failed (%s: %s); L2 bypassed for %.0f s",
                    operation,
                    type(exc).__name__,
                    exc,
                    self.breaker.backoff,
                )
            self.breaker.failure()
            self.metrics.redis_up.set(0)
            return None
        if self.breaker.failed:
            log.info("redis is back; L2 cache enabled again")
        self.breaker.success()
        self.metrics.redis_up.set(1)
        return result

    async def close(self) -> None:
        await self.flush()
        if self.redis is not None:
            await self.redis.aclose()


def connect_redis(url: str, timeout_sec: float) -> Any:
    """A redis.asyncio client that fails fast: short socket timeouts and no client-side retries."""
    from redis.asyncio import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Redis.from_url(
        url,
        socket_timeout=timeout_sec,
        socket_connect_timeout=timeout_sec,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class SingleFlight:
    """Identical concurrent misses share one computation.

    The computation runs as its own task, so a caller that goes away (client disconnect) does not cancel it for the
    others; when the last caller has gone, it is cancelled too, so no work is left running for nobody.
    """

    def __init__(self) -> None:
        self.running: dict[str, asyncio.Task[Any]] = {}
        self.waiters: dict[asyncio.Task[Any], int] = {}

    async def run(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        task = self.running.get(key)
        if task is None:
            task = asyncio.ensure_future(compute())
            self.running[key] = task
            task.add_done_callback(lambda done: self._finish(key, done))
        self.waiters[task] = self.waiters.get(task, 0) + 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if self.waiters[task] == 1:
                task.cancel()
                if self.running.get(key) is task:  # a caller arriving now starts afresh, not on a cancelled task
                    del self.running[key]
            raise
        finally:
            self.waiters[task] -= 1
            if not self.waiters[task]:
                del self.waiters[task]

    def _finish(self, key: str, task: asyncio.Task[Any]) -> None:
        if self.running.get(key) is task:
            del self.running[key]
        if not task.cancelled():
            task.exception()  # mark as retrieved: each waiter re-raises it itself

"""BentoML's adaptive batching, fed in-process.

BentoML batches the concurrent calls of a `@bentoml.api(batchable=True)` method with its `CorkDispatcher`. Reaching
that method from another route of the same service (its self-proxy) or from another service (`bentoml.depends`)
goes through BentoML's aiohttp client, which dropped 7–14 % of calls with `ServerDisconnectedError` under 16
concurrent clients here (BentoML issues #3669, #4238; numbers in README § Architecture). So the HTTP routes hand
their texts to the same dispatcher class directly: the same batching policy (max batch size, latency budget,
503 when the queue cannot meet it), without an HTTP hop, JSON round trip or dropped connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
from bentoml._internal.marshal.dispatcher import CorkDispatcher, Job, NonBlockSema  # pinned: bentoml==1.4.40

T = TypeVar("T")
log = logging.getLogger("router.batching")


class Overloaded(RuntimeError):
    """The batch queue cannot answer within the latency budget: shed the request (HTTP 503)."""


def _overloaded() -> Any:
    raise Overloaded("the model queue cannot meet MAX_LATENCY_MS")


@dataclass
class Queued:
    """One text waiting in the dispatcher's queue; `abandoned` once its caller was cancelled (client gone)."""

    text: str
    abandoned: bool = False


class WakeOnFreeDispatcher(CorkDispatcher[Queued, Any]):
    """BentoML's `CorkDispatcher`, whose controller waits for a forward pass to end while every worker is busy,
    instead of looking at the semaphore again every millisecond (BentoML's `TICKET_INTERVAL` poll).

    Under load the workers are busy nearly all the time, and that poll woke the event loop 1,000 times a second for
    nothing: ~10 % of the loop's time under 64 cold clients (py-spy), time the loop and the model's threads then
    waited for the GIL (docs/performance.md). Everything else is BentoML's: the queue, the optimizer and its warm-up,
    the cork (wait for a fuller batch, still on the 1 ms tick), the latency backstop and the calls themselves.
    """

    @functools.cached_property
    def _freed(self) -> asyncio.Event:
        return asyncio.Event()

    async def outbound_call(self, inputs_info: tuple[Job[Queued, Any], ...], training: bool = False) -> None:
        try:
            await super().outbound_call(inputs_info, training)
        finally:
            self._freed.set()  # after BentoML's own `finally` has released the worker

    async def controller(self) -> None:
        """BentoML 1.4.40's `controller`: the optimizer's warm-up, then one dispatch decision per wake."""
        try:
            await self.train_optimizer(self.optimizer.N_SKIPPED_SAMPLE, self.optimizer.N_SKIPPED_SAMPLE + 6, 1)
            for required, batch_size in ((6, 1), (5, 2), (3, 3)):
                await self.train_optimizer(required, 1, batch_size)
                self.optimizer.trigger_refresh()
        except Exception:
            log.exception("warming up the batching optimizer failed")
        while True:
            try:
                await self._dispatch_next()
            except Exception:
                log.exception("dispatching a batch failed")

    async def _dispatch_next(self) -> None:
        """BentoML's loop body, but for the busy branch: there it waits for `_freed`, not 1 ms."""
        async with self._wake_event:  # until something is queued
            await self._wake_event.wait_for(self._queue.__len__)
        n = len(self._queue)
        now = time.time()
        w0 = now - self._queue[0].enqueue_time  # the wait of the oldest text
        wn = now - self._queue[-1].enqueue_time  # and of the newest
        a, b = self.optimizer.o_a, self.optimizer.o_b
        if n > 1 and w0 + a * n + b >= self.max_latency:  # the backstop: the oldest could not make it
            self._queue.popleft().future.cancel()
            return
        if self._sema.is_locked():
            if n == 1 and w0 >= self.max_latency:
                self._queue.popleft().future.cancel()
                return
            self._freed.clear()
            await self._freed.wait()
            return
        if n < self.max_batch_size and n * (wn + self.TICKET_INTERVAL + (a or 0)) <= self.optimizer.wait * 0.95:
            await asyncio.sleep(self.TICKET_INTERVAL)  # the cork: a fuller batch is worth the wait
            return
        self._sema.acquire()
        self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))


class AdaptiveBatcher(Generic[T]):
    """`await batcher.run(text)`: concurrent calls are merged into `predict_batch(texts)` calls, each in a worker
    thread, up to `workers` of them at once.

    A caller that is cancelled while its text still waits in the queue leaves the next batch: the model never
    spends a forward pass on an answer nobody will read.

    Admission: a text that the measured pace says cannot be answered within `max_latency_ms` is refused at once
    (`Overloaded`), so a client past capacity is refused in a millisecond instead of after waiting in the queue
    (BentoML's dispatcher only cancels a request once it has waited past the budget), and the accepted ones keep
    their latency. (The service sends that 503 after SHED_DELAY_MS, to pace clients that retry at once.)
    """

    COST_WINDOW = 64  # forward passes the cost model is fitted on
    DISPATCHER_SLACK = 3  # the dispatcher's own latency limit, in MAX_LATENCY_MS (a backstop, see __init__)

    def __init__(
        self,
        predict_batch: Callable[[list[str]], list[T]],
        max_batch_size: int,
        max_latency_ms: int,
        workers: int = 1,
    ) -> None:
        self.predict_batch = predict_batch
        self.max_batch_size = max_batch_size
        self.budget_s = max_latency_ms / 1000
        self.workers = workers  # forward passes at once (MODEL_WORKERS), each in its own thread
        self.pending = 0  # texts queued or in a forward pass
        self.in_flight = 0  # texts in forward passes
        self.running = 0  # forward passes running
        self.passes: deque[tuple[int, float]] = deque(maxlen=self.COST_WINDOW)  # (texts, seconds) per pass
        self.cost = (0.0, 0.0)  # seconds per forward pass + seconds per text; zero until one has run
        dispatcher = WakeOnFreeDispatcher(
            # Admission at the door (`run`) keeps the budget. The dispatcher's own check cancels the oldest queued text
            # once its wait plus one pass over the *whole* queue would pass the latency, as if one worker took every
            # queued text in one batch: at 150 clients it cancelled texts due in 0.6 s. Its limit stays as a backstop
            # for a text that waits far longer than the cost model said.
            max_latency_in_ms=max_latency_ms * self.DISPATCHER_SLACK,
            max_batch_size=max_batch_size,
            # At most `workers` batches at once: the dispatcher starts one only while a worker is free.
            shared_sema=NonBlockSema(workers),
            fallback=_overloaded,
            get_batch_size=lambda _: 1,  # one text per call: the dispatcher never has to split one
        )
        self.dispatcher = dispatcher
        self.dispatch: Callable[[Queued], Awaitable[T]] = dispatcher(self._run_merged)  # type: ignore[assignment]

    def expected_wait_s(self) -> float:
        """When a text queued now would be answered, by the fitted cost: until a worker is free (a pass of average
        size in flight, when all are busy), then the passes that hold the queued texts and this one, spread over
        the workers (a free worker takes everything queued, up to the batch size)."""
        per_pass, per_text = self.cost
        busy = self.running >= self.workers
        until_free = per_pass + per_text * self.in_flight / self.running if busy else 0.0
        # Texts whose callers were cancelled mid-pass still count in `in_flight` but no longer in `pending`.
        queued = max(self.pending - self.in_flight, 0) + 1
        passes = math.ceil(queued / self.max_batch_size)
        rounds = math.ceil(passes / self.workers)
        return until_free + rounds * per_pass + queued * per_text / min(passes, self.workers)

    def calibrate(self, predict: Callable[[list[str]], object], text: str) -> None:
        """Seed the cost model before traffic (at load, in the loading thread): without it, a first burst would be
        admitted whole, because no pass has been measured yet."""
        for size in sorted({1, max(1, self.max_batch_size // 2), self.max_batch_size}):
            start = time.perf_counter()
            predict([text] * size)
            self._record(size, time.perf_counter() - start)

    def _record(self, texts: int, seconds: float) -> None:
        """Fit `seconds = per_pass + per_text * texts` on the recent passes (proportional when sizes don't vary)."""
        self.passes.append((texts, seconds))
        sizes, durations = [p[0] for p in self.passes], [p[1] for p in self.passes]
        if len(set(sizes)) > 1:
            per_text, per_pass = statistics.linear_regression(sizes, durations)
            if per_text > 0 and per_pass >= 0:
                self.cost = (per_pass, per_text)
                return
        self.cost = (0.0, sum(durations) / sum(sizes))

    async def run(self, text: str) -> T:
        # With nothing queued a text is always taken: the cost model must keep learning from real passes.
        if self.pending and (wait := self.expected_wait_s()) > self.budget_s:
            raise Overloaded(f"the model queue would take {wait:.2f} s, over MAX_LATENCY_MS")
        queued = Queued(text)
        self.pending += 1
        try:
            return await self.dispatch(queued)
        except Overloaded:
            # CorkDispatcher answers every cancelled wait with its fallback, ours included: tell them apart.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                queued.abandoned = True
                raise asyncio.CancelledError from None
            raise
        finally:
            self.pending -= 1

    async def _run_merged(self, calls: Sequence[Queued]) -> list[T | Exception | None]:
        """One forward pass for the texts still wanted. If it fails, each text is retried alone, so one text the
        model cannot handle fails its own request only, not the others that shared its batch."""
        wanted = [i for i, call in enumerate(calls) if not call.abandoned]
        out: list[T | Exception | None] = [None] * len(calls)
        if not wanted:
            return out
        try:
            results: list[T | Exception] = list(await self._predict([calls[i].text for i in wanted]))
        except Exception as exc:
            if len(wanted) == 1:
                raise
            log.warning(
                "a batch of %d failed (%s: %s); retrying its texts one by one", len(wanted), type(exc).__name__, exc
            )
            results = []
            for i in wanted:
                try:
                    results.extend(await self._predict([calls[i].text]))
                except Exception as single:  # the dispatcher raises an Exception result in its own caller only
                    results.append(single)
        for i, result in zip(wanted, results, strict=True):
            out[i] = result
        return out

    async def _predict(self, texts: list[str]) -> list[T]:
        self.in_flight += len(texts)
        self.running += 1
        try:
            results, seconds = await anyio.to_thread.run_sync(self._timed_predict, texts)
            self._record(len(texts), seconds)
        finally:
            self.in_flight -= len(texts)
            self.running -= 1
        return results

    def _timed_predict(self, texts: list[str]) -> tuple[list[T], float]:
        """The forward pass and its own duration, timed in its thread. Timed from the event loop it would also count
        the loop's lag in resuming the caller: under a storm of refused retries that lag grows, the cost model would
        take it for slower passes and refuse more, and the loop would spend itself on refusals while the model
        idles (300 retrying clients: 64 texts answered in 15 s)."""
        start = time.perf_counter()
        results = self.predict_batch(texts)
        return results, time.perf_counter() - start

    def shutdown(self) -> None:
        self.dispatcher.shutdown()

"""The in-process adaptive batcher (BentoML's CorkDispatcher): merging, abandoned callers, failing batches."""

from __future__ import annotations

import asyncio
import threading
import time

from router.batching import AdaptiveBatcher, Overloaded


class RecordingModel:
    """Stands in for the forward pass: upper-cases texts, records each batch, fails on "poison", can be held."""

    def __init__(self, per_pass_s: float = 0.0, per_text_s: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()
        self.per_pass_s, self.per_text_s = per_pass_s, per_text_s

    def __call__(self, texts: list[str]) -> list[str]:
        self.release.wait(5)
        time.sleep(self.per_pass_s + self.per_text_s * len(texts))
        self.batches.append(texts)
        if "poison" in texts:
            raise RuntimeError("inference failed")
        return [t.upper() for t in texts]


async def test_concurrent_calls_share_batches_and_get_their_own_answers() -> None:
    model = RecordingModel()
    batcher = AdaptiveBatcher(model, max_batch_size=8, max_latency_ms=5000)
    texts = [f"q{i}" for i in range(20)]
    assert await asyncio.gather(*(batcher.run(t) for t in texts)) == [t.upper() for t in texts]
    assert sorted(t for batch in model.batches for t in batch) == sorted(texts)
    assert max(len(b) for b in model.batches) > 1 and max(len(b) for b in model.batches) <= 8
    batcher.shutdown()


async def test_cancelled_callers_leave_the_queue_before_the_forward_pass() -> None:
    model = RecordingModel()
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=5000)
    for i in range(12):  # the dispatcher's first calls calibrate its cost model one text at a time
        await batcher.run(f"warm{i}")
    model.batches.clear()
    model.release.clear()  # the model is busy with the next batch...
    busy = asyncio.create_task(batcher.run("busy"))
    await asyncio.sleep(0.1)
    gone = [asyncio.create_task(batcher.run(f"gone{i}")) for i in range(6)]  # ...while these queue behind it
    kept = asyncio.create_task(batcher.run("kept"))
    await asyncio.sleep(0.05)
    for task in gone:
        task.cancel()
    await asyncio.sleep(0.01)
    model.release.set()
    assert await busy == "BUSY" and await kept == "KEPT"
    assert all(t.cancelled() for t in gone)
    assert [t for batch in model.batches for t in batch] == ["busy", "kept"]
    batcher.shutdown()


async def test_a_text_that_fails_the_forward_pass_fails_only_its_own_request() -> None:
    model = RecordingModel()
    batcher = AdaptiveBatcher(model, max_batch_size=8, max_latency_ms=5000)
    for i in range(12):
        await batcher.run(f"warm{i}")
    model.batches.clear()
    model.release.clear()
    busy = asyncio.create_task(batcher.run("busy"))
    await asyncio.sleep(0.1)
    texts = ["a", "b", "poison", "c", "d"]  # queued together behind "busy": one batch of five
    calls = [asyncio.create_task(batcher.run(t)) for t in texts]
    await asyncio.sleep(0.05)
    model.release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert await busy == "BUSY"
    assert model.batches[1] == texts  # they did share a batch, which failed as a whole...
    assert [o for o in outcomes if not isinstance(o, Exception)] == ["A", "B", "C", "D"]  # ...and were retried alone
    assert isinstance(outcomes[2], RuntimeError)
    assert await batcher.run("after") == "AFTER"
    batcher.shutdown()


async def test_past_its_budget_the_batcher_refuses_at_once_and_keeps_the_accepted_fast() -> None:
    model = RecordingModel(per_pass_s=0.05, per_text_s=0.01)  # a pass of 4 texts: 90 ms
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=600)
    for size in (1, 2, 3, 4, 1, 2, 3, 4):  # real passes of several sizes: the cost model is fitted on them
        await asyncio.gather(*(batcher.run(f"warm{size}-{i}") for i in range(size)))
    per_pass, per_text = batcher.cost
    assert 0.025 < per_pass < 0.075 and 0.005 < per_text < 0.02

    async def timed(i: int) -> tuple[bool, float]:
        start = time.perf_counter()
        try:
            await batcher.run(f"burst{i}")
            return True, time.perf_counter() - start
        except Overloaded:
            return False, time.perf_counter() - start

    outcomes = await asyncio.gather(*(timed(i) for i in range(100)))
    accepted = [t for ok, t in outcomes if ok]
    refused = [t for ok, t in outcomes if not ok]
    assert accepted and refused
    assert max(refused) < 0.05  # refused at the door, not after waiting for a pass
    assert max(accepted) < 0.6 + 0.1  # within the budget (plus scheduling slack)
    batcher.shutdown()


async def test_a_queue_longer_than_a_batch_is_answered_when_its_passes_fit_the_budget() -> None:
    """20 texts, batches of 4 on 2 workers: 3 rounds of 0.16 s passes, about 0.5 s, within the 0.6 s budget. BentoML's
    dispatcher on its own would cancel the oldest texts, estimating one pass over the whole queue (20 x 0.04 s)."""
    model = RecordingModel(per_text_s=0.04)
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=600, workers=2)
    for size in (1,) * 12 + (1, 2, 3, 4) * 2:  # the dispatcher's own training passes, then both cost models fitted
        await asyncio.gather(*(batcher.run(f"warm{size}-{i}") for i in range(size)))
    # BentoML's optimizer refits every 5 s; under real traffic it finds the true cost per text, 0.04 s here.
    batcher.dispatcher.optimizer.o_a, batcher.dispatcher.optimizer.o_b = 0.04, 0.0
    start = time.perf_counter()
    answers = await asyncio.gather(*(batcher.run(f"q{i}") for i in range(20)), return_exceptions=True)
    assert answers == [f"Q{i}" for i in range(20)]
    assert time.perf_counter() - start < 0.6 + 0.15  # within the budget (plus scheduling slack)
    batcher.shutdown()


async def test_with_two_workers_two_passes_run_at_once() -> None:
    model = RecordingModel()
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=5000, workers=2)
    for i in range(12):
        await batcher.run(f"warm{i}")
    model.batches.clear()
    model.release.clear()  # every pass blocks until released
    first = asyncio.create_task(batcher.run("first"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(batcher.run("second"))  # a worker is free: it does not wait behind "first"
    await asyncio.sleep(0.1)
    assert batcher.running == 2 and batcher.in_flight == 2
    third = [asyncio.create_task(batcher.run(f"third{i}")) for i in range(3)]  # both busy: these queue
    await asyncio.sleep(0.1)
    assert batcher.running == 2 and batcher.pending == 5
    model.release.set()
    assert await first == "FIRST" and await second == "SECOND"
    assert await asyncio.gather(*third) == ["THIRD0", "THIRD1", "THIRD2"]
    # One pass for the three, once a worker was free. Batches are recorded as they end, and the freed worker's
    # next pass may end before the other worker's thread records "first", so the order is not asserted.
    assert sorted(sorted(batch) for batch in model.batches) == [["first"], ["second"], ["third0", "third1", "third2"]]
    assert batcher.running == 0 and batcher.in_flight == 0 and batcher.pending == 0
    batcher.shutdown()


async def test_while_every_worker_is_busy_the_dispatcher_sleeps_until_a_pass_ends() -> None:
    """BentoML's controller looked at its semaphore every millisecond while the workers were busy; ours waits."""
    model = RecordingModel()
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=5000)
    for i in range(12):
        await batcher.run(f"warm{i}")
    decisions = 0
    dispatch_next = batcher.dispatcher._dispatch_next

    async def counted() -> None:
        nonlocal decisions
        decisions += 1
        await dispatch_next()

    batcher.dispatcher._dispatch_next = counted  # type: ignore[method-assign]
    await batcher.run("wake")  # the controller now runs the counted loop
    model.batches.clear()
    model.release.clear()
    busy = asyncio.create_task(batcher.run("busy"))
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(batcher.run(f"q{i}")) for i in range(3)]
    await asyncio.sleep(0.05)
    decisions = 0
    await asyncio.sleep(0.3)  # the worker stays busy: polling every 1 ms would decide ~300 times here
    assert decisions == 0
    model.release.set()
    assert await busy == "BUSY" and await asyncio.gather(*queued) == ["Q0", "Q1", "Q2"]
    assert sorted(model.batches[-1]) == ["q0", "q1", "q2"]  # dispatched once the pass ended, in one batch
    batcher.shutdown()


def test_expected_wait_counts_the_busy_workers_and_spreads_the_queue_over_them() -> None:
    batcher = AdaptiveBatcher(RecordingModel(), max_batch_size=4, max_latency_ms=5000, workers=2)
    batcher.cost = (0.1, 0.01)
    assert abs(batcher.expected_wait_s() - (0.1 + 0.01)) < 1e-9  # idle: one pass of its own
    batcher.pending, batcher.in_flight, batcher.running = 10, 4, 2  # both workers busy with 2 texts each, 6 queued
    # until a worker is free (a pass of 2), then 7 texts in 2 passes, one on each worker
    assert abs(batcher.expected_wait_s() - ((0.1 + 0.02) + 0.1 + 7 * 0.01 / 2)) < 1e-9
    batcher.pending, batcher.in_flight, batcher.running = 5, 2, 1  # a worker is free: it takes the 3 queued + this
    assert abs(batcher.expected_wait_s() - (0.1 + 4 * 0.01)) < 1e-9
    batcher.shutdown()


def test_expected_wait_after_callers_left_a_running_pass() -> None:
    """Clients that disconnect while their texts are in a forward pass leave `pending` but not `in_flight`. The next
    text was then counted as 0 queued in 0 passes, and the division by zero failed it with a 500 (found by the
    benchmark: wrk cuts its connections at the end of a run)."""
    batcher = AdaptiveBatcher(RecordingModel(), max_batch_size=4, max_latency_ms=5000, workers=2)
    batcher.cost = (0.1, 0.01)
    batcher.pending, batcher.in_flight, batcher.running = 1, 3, 1  # 3 texts in a pass, 2 of their callers gone
    assert abs(batcher.expected_wait_s() - (0.1 + 0.01)) < 1e-9  # a worker is free: one pass of its own
    batcher.running = 2  # both busy: until one is free, then its own pass
    assert abs(batcher.expected_wait_s() - ((0.1 + 0.015) + (0.1 + 0.01))) < 1e-9
    batcher.shutdown()


async def test_the_cost_model_times_the_forward_pass_not_the_event_loops_lag() -> None:
    """A busy event loop (say, refusing a storm of retries) resumes the caller late; that lag is no slower model, and
    counting it would make admission refuse more, and keep the loop busier, until the model sits idle."""
    model = RecordingModel(per_pass_s=0.02)
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=5000)

    async def hog_the_loop() -> None:
        await asyncio.sleep(0.005)  # the pass is running in its thread by now
        time.sleep(0.4)  # the loop does nothing else for 0.4 s

    answer, _ = await asyncio.gather(batcher.run("q"), hog_the_loop())
    assert answer == "Q" and model.batches == [["q"]]
    (texts, seconds), *_ = batcher.passes
    assert texts == 1 and 0.02 <= seconds < 0.2  # the pass's own 20 ms, not the loop's 400
    batcher.shutdown()

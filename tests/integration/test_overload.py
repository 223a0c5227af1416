"""Past capacity the service sheds load: quick 503s with Retry-After, while accepted requests keep their latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


async def burst(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(
            *(client.post("/v1/query-classify", json={"text": f"overload query number {i} " * 8}) for i in range(count))
        )


def test_a_burst_past_capacity_is_shed_quickly(server_factory: Callable[..., Any]) -> None:
    """Latencies are the server's own (x-router-latency): on 2 cores the Python client of 300 connections takes
    seconds itself, which says nothing about the router. tests/unit/test_batching.py pins the admission rule."""
    # The embedded model, a tight latency budget, and refusals sent at once: this checks where they are decided.
    with server_factory({"MAX_LATENCY_MS": "100", "SHED_DELAY_MS": "0"}) as server:
        results = asyncio.run(burst(server.url, 300))
        assert {r.status_code for r in results} <= {200, 503}
        shed = [r for r in results if r.status_code == 503]
        accepted = [r for r in results if r.status_code == 200]
        assert shed, "300 concurrent cold queries against a 100 ms budget must shed some"
        assert accepted, "and still answer some"
        shed_ms = sorted(float(r.headers["x-router-latency"]) for r in shed)
        accepted_ms = sorted(float(r.headers["x-router-latency"]) for r in accepted)
        print(
            f"burst of 300 (server-side ms): {len(accepted)} accepted (p50 {accepted_ms[len(accepted_ms) // 2]:.0f}, "
            f"p99 {accepted_ms[int(len(accepted_ms) * 0.99)]:.0f}), {len(shed)} shed "
            f"(p50 {shed_ms[len(shed_ms) // 2]:.0f}, p99 {shed_ms[int(len(shed_ms) * 0.99)]:.0f})"
        )
        for response in shed:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["status"] == "UNAVAILABLE"
        # Refused at the door: a rejection never waits for the model the way an accepted answer does.
        assert shed_ms[len(shed_ms) // 2] < accepted_ms[len(accepted_ms) // 2]
        assert server.classify("after the burst").status_code == 200


def test_a_refusal_is_sent_after_the_shed_delay(server_factory: Callable[..., Any]) -> None:
    """With one miss allowed to wait, a burst of 20 is refused but for a few, each refusal after SHED_DELAY_MS, so a
    client that retries at once comes back paced instead of in a millisecond."""
    with server_factory({"MAX_QUEUE": "1", "SHED_DELAY_MS": "300"}) as server:
        results = asyncio.run(burst(server.url, 20))
        shed = [r for r in results if r.status_code == 503]
        assert shed and {r.status_code for r in results} <= {200, 503}
        for response in shed:
            assert response.headers["retry-after"] == "1"
            assert float(response.headers["x-router-latency"]) >= 299  # uvloop's timers count whole milliseconds
        assert server.metric("router_shed_total") == len(shed)
        assert server.classify("after the burst").status_code == 200


def test_clients_that_hang_up_leave_no_work_behind(server_factory: Callable[..., Any]) -> None:
    """Twenty clients give up while the model is busy: their texts never reach the model, nothing stays in flight,
    they are recorded as 499, and the server goes on answering."""
    env = {
        "MODEL_BACKEND": "torch",  # eager fp32 on the embedded model: slow enough to keep a queue for a second
        "MAX_BATCH_SIZE": "2",
        "MAX_BATCH_TEXTS": "200",
        "MAX_BODY_BYTES": "1048576",
        "MAX_LATENCY_MS": "60000",
        "MAX_QUEUE": "1000",
    }
    with server_factory(env) as server:
        texts_before = server.metric("router_batch_size_sum")
        busy_texts = [f"busy query {i}: " + "lorem ipsum dolor sit amet " * 30 for i in range(200)]
        url = f"{server.url}/v1/query-classify"

        def give_up(i: int) -> bool:
            try:
                httpx.post(url, json={"text": f"abandoned query {i}"}, timeout=0.3)
            except httpx.TimeoutException:
                return True
            return False

        with ThreadPoolExecutor(max_workers=21) as pool:
            busy = pool.submit(httpx.post, f"{url}:batch", json={"texts": busy_texts}, timeout=120)
            time.sleep(0.3)  # the 200 busy texts are queued first
            gave_up = list(pool.map(give_up, range(20)))
            assert busy.result().status_code == 200
        assert all(gave_up), "the model must still be busy when the clients give up"

        deadline = time.monotonic() + 10
        while server.metric("router_requests_in_progress", route="/v1/query-classify") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.metric("router_requests_in_progress", route="/v1/query-classify") == 0
        assert server.metric("router_requests_total", route="/v1/query-classify", status="499") == 20
        assert server.metric("router_batch_size_sum") - texts_before == 200  # the busy texts only
        # Still serving; the abandoned text was never computed, so it is computed now.
        assert server.classify("abandoned query 0").status_code == 200
        assert server.metric("router_batch_size_sum") - texts_before == 201

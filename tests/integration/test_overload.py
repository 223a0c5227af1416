"""Past capacity the service sheds load: quick 503s with Retry-After, while accepted requests keep their latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


async def burst(url: str, count: int) -> list[tuple[int, float, httpx.Response]]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(i: int) -> tuple[int, float, httpx.Response]:
            start = time.perf_counter()
            response = await client.post("/v1/query-classify", json={"text": f"overload query number {i} " * 8})
            return response.status_code, time.perf_counter() - start, response

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_a_burst_past_capacity_is_shed_quickly(server_factory: Callable[..., Any]) -> None:
    with server_factory({"MAX_LATENCY_MS": "150"}) as server:  # the embedded model, a tight latency budget
        results = asyncio.run(burst(server.url, 300))
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 503}
        shed = [(latency, r) for status, latency, r in results if status == 503]
        accepted = sorted(latency for status, latency, _ in results if status == 200)
        assert shed, "300 concurrent cold queries against a 150 ms budget must shed some"
        assert accepted, "and still answer some"
        shed_p50 = sorted(latency for latency, _ in shed)[len(shed) // 2]
        print(
            f"burst of 300: {len(accepted)} accepted (p50 {accepted[len(accepted) // 2]:.3f} s, "
            f"p99 {accepted[int(len(accepted) * 0.99)]:.3f} s), {len(shed)} shed (p50 {shed_p50:.3f} s)"
        )
        for _, response in shed:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["status"] == "UNAVAILABLE"
        # Rejections come back quickly instead of queueing behind the accepted work.
        assert shed_p50 < 2.0
        assert server.classify("after the burst").status_code == 200

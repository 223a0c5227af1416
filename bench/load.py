"""A bounded closed-loop HTTP load generator: N clients, each sending its next request when the last one answered."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx


@dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_kinds: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run_load(
    url: str,
    make_body: Callable[[int], dict[str, object]],
    clients: int,
    total_requests: int,
    timeout: float = 30.0,
) -> LoadResult:
    """Send `total_requests` POSTs from `clients` concurrent loops; body i comes from make_body(i)."""
    latencies: list[float] = []
    errors = 0
    error_kinds: dict[str, int] = {}
    counter = iter(range(total_requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def loop() -> None:
            nonlocal errors
            for i in counter:
                start = time.perf_counter()
                try:
                    response = await client.post(url, json=make_body(i))
                    kind = "" if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                latencies.append(time.perf_counter() - start)
                if kind:
                    errors += 1
                    error_kinds[kind] = error_kinds.get(kind, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        seconds = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return LoadResult(
        clients=clients,
        requests=len(ms),
        errors=errors,
        seconds=round(seconds, 2),
        rps=round(len(ms) / seconds, 1),
        p50_ms=round(statistics.median(ms), 2),
        p95_ms=round(percentile(ms, 95), 2),
        p99_ms=round(percentile(ms, 99), 2),
        error_kinds=error_kinds,
    )

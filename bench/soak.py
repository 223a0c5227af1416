"""The soak: `python -m bench.soak` serves the embedded model and sends moderate open-loop load for a bounded time.

An open loop (a fixed arrival rate, unlike the benchmark's closed-loop clients) keeps the load moderate whatever the
server's speed: half the queries come from a hot set (cache hits), half are new (misses that grow the L1 cache up to
`CACHE_L1_SIZE`). Every slice records throughput, latency, errors, the server's RSS and the L1 entry count, so the RSS
curve can be read against the cache's bound. Verdict: no error, and no RSS growth beyond `--rss-slack-mib` once
the L1 cache is full. Writes bench/results/soak-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.queries import QueryGenerator
from bench.run import RESULTS, Sampler
from bench.server import Server, serve


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def slice_of_load(
    client: httpx.AsyncClient, next_text: Callable[[], str], rate: float, seconds: float
) -> dict[str, Any]:
    """`rate` requests/s for `seconds`, each sent on schedule whatever the others do (open loop)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def one(text: str) -> None:
        start = time.perf_counter()
        try:
            response = await client.post("/v1/query-classify", json={"text": text})
            if response.status_code != 200:
                errors[f"HTTP {response.status_code}: {response.text[:120]}"] += 1
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
        latencies.append((time.perf_counter() - start) * 1000)

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(next_text())))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
    }


async def soak(server: Server, args: argparse.Namespace) -> list[dict[str, Any]]:
    sampler = Sampler(psutil.Process(server.process.pid))
    generator = QueryGenerator(seed=2)
    hot = generator.hot_set(500)
    chooser = random.Random(3)

    def next_text() -> str:
        return chooser.choice(hot) if chooser.random() < args.hot_share else generator.unique()

    rows = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
        begin = time.perf_counter()
        while time.perf_counter() - begin < args.minutes * 60:
            row = await slice_of_load(client, next_text, args.rate, args.slice_seconds)
            deep = (await client.get("/health/deep")).json()
            row = {
                "t_s": round(time.perf_counter() - begin),
                **row,
                "rss_mib": round(sampler.rss() / 2**20, 1),
                "l1_entries": deep["cache"]["l1_entries"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def verdict(rows: list[dict[str, Any]], l1_size: int, slack_mib: float) -> dict[str, object]:
    full = [r for r in rows if r["l1_entries"] >= l1_size]
    growth = round(rows[-1]["rss_mib"] - full[0]["rss_mib"], 1) if full else None
    errors = int(sum(r["errors"] for r in rows))
    return {
        "errors": errors,
        "rss_start_mib": rows[0]["rss_mib"],
        "rss_peak_mib": max(r["rss_mib"] for r in rows),
        "rss_when_l1_full_mib": full[0]["rss_mib"] if full else None,
        "rss_growth_after_l1_full_mib": growth,
        "passed": errors == 0 and growth is not None and growth <= slack_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=60, help="Requests per second (open loop).")
    parser.add_argument("--hot-share", type=float, default=0.5, help="Share of queries from the hot set.")
    parser.add_argument("--slice-seconds", type=float, default=30)
    parser.add_argument("--l1-size", type=int, default=5000, help="CACHE_L1_SIZE of the soaked server.")
    parser.add_argument("--rss-slack-mib", type=float, default=32, help="Allowed RSS growth once L1 is full.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    with serve({"CACHE_L1_SIZE": str(args.l1_size), "ACCESS_LOG": "false"}, work) as server:
        rows = asyncio.run(soak(server, args))
    summary = {"settings": vars(args), **verdict(rows, args.l1_size, args.rss_slack_mib)}
    head = "| t s | requests | errors | RPS | p50 ms | p99 ms | RSS MiB | L1 entries |\n|" + "---:|" * 8
    lines = [head] + [
        f"| {r['t_s']} | {r['requests']} | {r['errors']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} "
        f"| {r['rss_mib']} | {r['l1_entries']} |"
        for r in rows
    ]
    table = "\n".join([*lines, "", *(f"- {k}: {v}" for k, v in summary.items())])
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"soak-{stamp}.json").write_text(json.dumps({"rows": rows, **summary}, indent=2) + "\n")
    (RESULTS / f"soak-{stamp}.md").write_text(table + "\n")
    if not summary["passed"]:
        raise SystemExit("soak failed: " + json.dumps(summary))


if __name__ == "__main__":
    main()

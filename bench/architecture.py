"""One service vs. two composed services: which batches under concurrent load at the lower overhead?

`python -m bench.architecture` starts each design on loopback with the same model and no cache, sends unique
texts from 1, 16 and 64 concurrent clients, and prints RPS, latency and the mean batch size each design formed.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from bench.load import run_load
from bench.server import Server, serve

DESIGNS = {
    "one service (in-process batcher)": "service:QueryRouter",
    "two services (bentoml.depends)": "bench.two_services:Gateway",
}


def batch_totals(server: Server) -> tuple[float, float]:
    """(forward passes, texts) so far: the router's histogram, or BentoML's for the two-service design."""
    count = server.metric("router_batch_size_count") + server.metric("bentoml_service_adaptive_batch_size_count")
    total = server.metric("router_batch_size_sum") + server.metric("bentoml_service_adaptive_batch_size_sum")
    return count, total


def main() -> None:
    rows = []
    logs = Path(tempfile.mkdtemp())
    for name, target in DESIGNS.items():
        with serve(
            {"CACHE_L1_SIZE": "0", "MAX_LATENCY_MS": "5000"}, logs, target=target, ready_path="/readyz"
        ) as server:
            for clients in (1, 16, 64):
                count_before, sum_before = batch_totals(server)

                def body(i: int, c: int = clients) -> dict[str, object]:
                    return {"text": f"arch {c} query {i}: how do tides work near the coast?"}

                result = asyncio.run(
                    run_load(
                        f"{server.url}/v1/query-classify",
                        body,
                        clients=clients,
                        total_requests=max(200, clients * 12),
                    )
                )
                count_after, sum_after = batch_totals(server)
                batches, texts = count_after - count_before, sum_after - sum_before
                rows.append({"design": name, **result.as_dict(), "mean_batch": round(texts / max(batches, 1), 1)})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| design | clients | RPS | p50 ms | p99 ms | mean batch | errors |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [r[k] for k in ("design", "clients", "rps", "p50_ms", "p99_ms", "mean_batch", "errors")]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()

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
from bench.server import serve

DESIGNS = {
    "one service (in-process batcher)": "service:QueryRouter",
    "two services (bentoml.depends)": "bench.two_services:Gateway",
}


def main() -> None:
    rows = []
    logs = Path(tempfile.mkdtemp())
    for name, target in DESIGNS.items():
        with serve(
            {"CACHE_L1_SIZE": "0", "MAX_LATENCY_MS": "5000"}, logs, target=target, ready_path="/readyz"
        ) as server:
            for clients in (1, 16, 64):
                count_before = server.metric("bentoml_service_adaptive_batch_size_count")
                sum_before = server.metric("bentoml_service_adaptive_batch_size_sum")
                result = asyncio.run(
                    run_load(
                        f"{server.url}/v1/query-classify",
                        lambda i, c=clients: {"text": f"arch {c} query {i}: how do tides work near the coast?"},
                        clients=clients,
                        total_requests=max(200, clients * 12),
                    )
                )
                batches = server.metric("bentoml_service_adaptive_batch_size_count") - count_before
                texts = server.metric("bentoml_service_adaptive_batch_size_sum") - sum_before
                rows.append({"design": name, **result.as_dict(), "mean_batch": round(texts / max(batches, 1), 1)})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| design | clients | RPS | p50 ms | p99 ms | mean batch | errors |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['design']} | {r['clients']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()

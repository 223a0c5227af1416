"""One service vs. two composed services: which batches under concurrent load at the lower overhead?

`python -m bench.architecture` (needs wrk) starts each design on loopback with the same model and no cache, sends
unique dolly queries (as `python -m bench`'s cold scenarios do) from 1, 16 and 64 concurrent wrk clients for
`--seconds` each, and prints RPS, latency, errors and the mean batch size each design formed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.queries import QueryGenerator
from bench.run import write_bodies, wrk, wrk_figures
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="Duration of each load scenario.")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    generator = QueryGenerator(seed=3)
    work = Path(tempfile.mkdtemp(prefix="bench-architecture-"))
    rows = []
    for name, target in DESIGNS.items():
        with serve({"CACHE_L1_SIZE": "0"}, work, target=target, ready_path="/readyz") as server:
            for clients in (1, 16, 64):
                bodies = write_bodies([generator.unique() for _ in range(40000)], work, f"arch{clients}")
                count_before, sum_before = batch_totals(server)
                summary = wrk(f"{server.url}/v1/query-classify", bodies, clients, args.seconds)
                count_after, sum_after = batch_totals(server)
                batches, texts = count_after - count_before, sum_after - sum_before
                rows.append(
                    {
                        "design": name,
                        "clients": clients,
                        **wrk_figures(summary),
                        "mean_batch": round(texts / batches, 1) if batches else None,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print("\n| design | clients | RPS | p50 ms | p99 ms | mean batch | errors |\n|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [row[k] for k in ("design", "clients", "rps", "p50_ms", "p99_ms", "mean_batch")]
        cells.append(f"{row['errors']} / {row['requests']}")
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


if __name__ == "__main__":
    main()

"""Model alone, per backend: queries/s of batched forward passes and accuracy on the held-out dolly test split.

`python -m bench.backends [--data ../shared/data/dolly.jsonl]` — the "model alone" reference of the benchmark and the
table behind the MODEL_BACKEND default (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from router.config import Settings
from router.inference import Classifier
from router.model import resolve_model
from training import data

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly.jsonl"
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dolly_sample.jsonl"


def throughput(classifier: Classifier, texts: list[str], batch_size: int, seconds: float, workers: int = 1) -> float:
    """Queries/s of batched forward passes over `texts` for `seconds`, `workers` threads side by side (as the
    service runs them, MODEL_WORKERS)."""
    done, start = [0] * workers, time.perf_counter()

    def work(worker: int) -> None:
        i = worker * batch_size
        while time.perf_counter() - start < seconds:
            batch = texts[i % len(texts) : i % len(texts) + batch_size]
            classifier.predict(batch)
            done[worker] += len(batch)
            i += batch_size * workers

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(workers)))
    return sum(done) / (time.perf_counter() - start)


def measure(backend: str, texts: list[str], labels: list[str], batch_size: int, seconds: float) -> dict[str, object]:
    settings = Settings(model_backend=backend)  # type: ignore[arg-type]
    classifier = Classifier.load(resolve_model(settings), settings)
    classifier.warm_up()
    predictions = []
    for i in range(0, len(texts), batch_size):
        predictions += classifier.predict(texts[i : i + batch_size])
    accuracy = sum(p.label == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
    rate = throughput(classifier, texts, batch_size, seconds, workers=settings.forward_passes())
    return {
        "backend": backend,
        "batch_size": batch_size,
        "queries_per_s": round(rate, 1),
        "accuracy": round(accuracy, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.exists() else FIXTURE)
    parser.add_argument("--backends", nargs="+", default=["torch", "torch-int8"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    examples, _ = data.to_examples(data.load_records(str(args.data)))
    test = data.split(examples, seed=42).test if len(examples) > 100 else examples
    texts, labels = [e.text for e in test], [str(e.label) for e in test]
    rows = [measure(b, texts, labels, args.batch_size, args.seconds) for b in args.backends]
    for row in rows:
        print(json.dumps(row))
    print(f"\n| backend | queries/s (batch {args.batch_size}) | test accuracy |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['backend']} | {row['queries_per_s']} | {row['accuracy']:.4f} |")


if __name__ == "__main__":
    main()

"""The checks of scripts/container_smoke.sh that talk HTTP: the running container, then the host server.

    python scripts/compare_container.py check URL --cache-l1-size N --out FILE
        the container at URL is ready, serves the embedded default model, classifies, and reaches Redis (L2 on,
        PING ok, router_redis_up 1, a repeated text answered from Redis); writes its answers to FILE.
    python scripts/compare_container.py compare FILE
        `bentoml serve service:QueryRouter` on the host (bench.server.serve) gives the same model identity, the same
        labels and confidences within 1e-4 for the same texts.
Run from the repository root (it imports bench.server).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ and router/ when run as a script

from bench.server import metric_values, serve
from training.data import FAST, SLOW, load_jsonl, to_examples

EMBEDDED_NAME = "embedded:query-router-default"
TOLERANCE = 1e-4
LATENCY_SAMPLES = 20
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dolly_sample.jsonl"


def sample_texts(per_label: int = 4) -> list[str]:
    """Real dolly queries of both labels (the test fixture), so both of the model's answers are compared."""
    in_scope, _ = to_examples(load_jsonl(FIXTURE))
    return [e.text for label in (FAST, SLOW) for e in [x for x in in_scope if x.label == label][:per_label]]


TEXTS = sample_texts()


class CheckFailed(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"FAILED: {message}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# One client for every call: a new httpx client per request builds a TLS context (~30 ms) that would be timed too.
HTTP_TIMEOUT_SEC = 30
HTTP = httpx.Client(timeout=HTTP_TIMEOUT_SEC)


def classify(url: str, text: str) -> dict[str, Any]:
    response = HTTP.post(f"{url}/v1/query-classify", json={"text": text})
    expect(response.status_code == 200, f"POST /v1/query-classify {text!r}: {response.status_code} {response.text}")
    answer = dict(response.json())
    expect(answer["label"] in ("0", "1"), f"label {answer['label']!r}")
    expect(isinstance(answer["confidence"], float) and 0 <= answer["confidence"] <= 1, f"confidence {answer}")
    return answer


def timed_classify_ms(url: str, text: str) -> float:
    start = time.perf_counter()
    classify(url, text)
    return (time.perf_counter() - start) * 1000


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when absent): a counter over all workers."""
    return sum(metric_values(url, name, labels, HTTP_TIMEOUT_SEC))


def deep(url: str) -> dict[str, Any]:
    return dict(HTTP.get(f"{url}/health/deep").json())


def check_container(url: str, cache_l1_size: int, out: Path) -> None:
    health = deep(url)
    model, cache = health["model"], health["cache"]
    print(f"model: source={model['source']} name={model['name']} identity={model['identity']}")
    print(f"worker processes: {health['worker']['workers']}")
    print(
        f"cache: l1_max_size={cache['l1_max_size']} l2_configured={cache['l2_configured']} "
        f"redis_reachable={cache['redis_reachable']}"
    )
    expect(health["status"] == "ready", f"/health/deep status {health['status']}: {health['error']}")
    expect(model["source"] == "embedded" and model["name"] == EMBEDDED_NAME, "not the embedded default model")
    expect(model["trained"] is True, "the embedded model is untrained (router/default_model missing from the image)")
    expect(cache["l1_max_size"] == cache_l1_size, f"CACHE_L1_SIZE={cache_l1_size} did not reach the service")
    expect(cache["l2_configured"] is True and cache["redis_reachable"] is True, "Redis not reachable from inside")

    answers = [classify(url, text) for text in TEXTS]
    for text, answer in zip(TEXTS, answers, strict=True):
        print(f"  {answer['label']} {answer['confidence']:.6f}  {text[:70]!r}")
    expect({a["label"] for a in answers} == {"0", "1"}, "the model gave one label to fast and slow dolly queries")

    # New texts (cache misses: Redis GET, the model, Redis SET), then the same texts again: with L1 disabled the
    # second answers can only come from Redis. The medians of LATENCY_SAMPLES requests are the reported latencies.
    fresh = [f"How long should I boil an egg? (smoke {uuid.uuid4().hex[:8]})" for _ in range(LATENCY_SAMPLES)]
    l2_hits = metric(url, "router_cache_hits_total", level="l2")
    latency = {
        "miss": statistics.median(timed_classify_ms(url, text) for text in fresh),
        "hit": statistics.median(timed_classify_ms(url, text) for text in fresh),
    }
    expect(metric(url, "router_cache_hits_total", level="l2") == l2_hits + len(fresh), "repeated texts missed Redis")
    redis_up = metric_values(url, "router_redis_up", {}, HTTP_TIMEOUT_SEC)
    expect(len(redis_up) == health["worker"]["workers"] and set(redis_up) == {1}, f"router_redis_up {redis_up}, not 1")
    expect(metric(url, "router_redis_errors_total") == 0, "Redis errors counted")
    print(f"redis: router_redis_up=1, repeated texts answered from Redis; median latency {latency} ms")
    out.write_text(json.dumps({"identity": model["identity"], "answers": answers, "latency_ms": latency}))


def compare_with_host(container_file: Path) -> None:
    container = json.loads(container_file.read_text())
    with tempfile.TemporaryDirectory() as log_dir, serve({}, Path(log_dir)) as server:
        identity = deep(server.url)["model"]["identity"]
        answers = [classify(server.url, text) for text in TEXTS]
    expect(identity == container["identity"], f"model identity: host {identity}, container {container['identity']}")
    worst = 0.0
    for text, host, inside in zip(TEXTS, answers, container["answers"], strict=True):
        difference = abs(host["confidence"] - inside["confidence"])
        worst = max(worst, difference)
        print(
            f"  host {host['label']} {host['confidence']:.6f}  container {inside['label']} "
            f"{inside['confidence']:.6f}  {text[:50]!r}"
        )
        expect(host["label"] == inside["label"], f"labels differ for {text!r}")
        expect(difference <= TOLERANCE, f"confidences differ by {difference} for {text!r}")
    print(f"same model identity, same {len(TEXTS)} labels, largest confidence difference {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check the running container")
    check.add_argument("url")
    check.add_argument("--cache-l1-size", type=int, required=True, help="the CACHE_L1_SIZE the container got")
    check.add_argument("--out", type=Path, required=True, help="where to write the container's answers")
    compare = commands.add_parser("compare", help="serve on the host and compare with the container's answers")
    compare.add_argument("container_file", type=Path)
    args = parser.parse_args()
    if args.command == "check":
        check_container(args.url, args.cache_l1_size, args.out)
    else:
        compare_with_host(args.container_file)


if __name__ == "__main__":
    main()

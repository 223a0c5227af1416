"""The real service (`bentoml serve` subprocess) with tiny real models, a real Redis and real HTTP."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import psutil
import pytest

from router.config import Settings
from tests.conftest import RedisServer, Server

pytestmark = pytest.mark.integration

P_FAST = 1 / (1 + math.exp(-6.0))  # softmax([3, -3])[0], the fast_model's answer for every text
REQUEST_TIMEOUT_SEC = 3  # the module's server: every answer here starts well within it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fast_model: Path) -> Iterator[Server]:
    """One service on the constant fast model, shared by the read-only tests of this module."""
    from tests.conftest import serve

    env = {"MODEL_PATH": str(fast_model), "REQUEST_TIMEOUT_SEC": str(REQUEST_TIMEOUT_SEC)}
    with serve(env, tmp_path_factory.mktemp("logs")) as running:
        yield running


def test_classify_returns_label_confidence_and_latency_header(server: Server) -> None:
    response = server.classify("Classify these animals: cat, shark, eagle")
    assert response.status_code == 200
    body = response.json()
    assert body == {"label": "0", "confidence": pytest.approx(P_FAST, abs=1e-5)}
    assert 0 < float(response.headers["x-router-latency"]) < 30000


def test_request_id_is_echoed(server: Server) -> None:
    assert server.classify("hello there", request_id="req-42").json()["request_id"] == "req-42"


def test_repeat_is_an_l1_cache_hit(server: Server) -> None:
    hits = server.metric("router_cache_hits_total", level="l1")
    batches = server.metric("router_batch_size_count")
    text = "What is the capital of Peru? (cache test)"
    first, second = server.classify(text), server.classify("  What is the capital   of Peru? (cache test) ")
    assert first.json() == second.json()
    assert server.metric("router_cache_hits_total", level="l1") == hits + 1  # normalised text, same key
    assert server.metric("router_batch_size_count") == batches + 1  # the model ran once


def test_a_hit_is_answered_like_a_miss_and_counted_once(server: Server) -> None:
    """Hits are answered before FastAPI (router.api.CacheHits); the answer, the request_id and the counts are the
    same, and what that path does not accept (a request_id over 128 characters) still gets FastAPI's 422."""
    text = f"Summarize the plot of Hamlet {uuid.uuid4()}"
    misses = server.metric("router_cache_misses_total", level="l1")
    hits = server.metric("router_cache_hits_total", level="l1")
    decisions = server.metric("router_decisions_total")
    miss = server.classify(text, request_id="first")
    assert server.metric("router_cache_misses_total", level="l1") == misses + 1
    hit = server.classify(text, request_id="second")
    assert server.metric("router_cache_hits_total", level="l1") == hits + 1
    assert server.metric("router_cache_misses_total", level="l1") == misses + 1
    assert miss.json() == {**hit.json(), "request_id": "first"} and hit.json()["request_id"] == "second"
    assert hit.headers["content-type"] == miss.headers["content-type"] == "application/json"
    assert float(hit.headers["x-router-latency"]) > 0
    assert server.classify(text).json() == {k: v for k, v in miss.json().items() if k != "request_id"}
    assert server.metric("router_decisions_total") == decisions + 3
    refused = server.classify(text, request_id="x" * 129)
    assert refused.status_code == 422 and "request_id" in refused.json()["error"]["message"]


def test_a_hit_whose_body_arrives_in_pieces_is_answered(server: Server) -> None:
    text = f"Classify these: apple, carrot {uuid.uuid4()}"
    expected = server.classify(text).json()
    body = ('{"text": "' + text + '"}').encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /v1/query-classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.2)
        client.sendall(body[10:])
        client.settimeout(10)
        answer = b""
        while not answer.endswith(b"}") and (more := client.recv(65536)):
            answer += more
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert httpx.Response(200, content=payload).json() == expected


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b'{"text": ""}', "application/json", 422),
        (b'{"text": "   \\n\\t "}', "application/json", 422),
        (b'{"text": "' + b"x" * 2049 + b'"}', "application/json", 422),
        (b'{"text": 42}', "application/json", 422),
        (b'{"text": ["a"]}', "application/json", 422),
        (b'{"text": null}', "application/json", 422),
        (b'{"txt": "hello"}', "application/json", 422),
        (b'{"text": "\\ud800 lone surrogate"}', "application/json", 422),
        (b'["hello"]', "application/json", 422),
        (b"{not json", "application/json", 400),
        (b"", "application/json", 422),
        (b"text=hello", "application/x-www-form-urlencoded", 415),
        (b'{"text": "' + b"y" * 70000 + b'"}', "application/json", 413),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_caches_nothing(
    server: Server, body: bytes, content_type: str, code: int
) -> None:
    entries = server.deep()["cache"]["l1_entries"]  # type: ignore[index]
    decisions = server.metric("router_decisions_total")
    response = httpx.post(f"{server.url}/v1/query-classify", content=body, headers={"content-type": content_type})
    assert response.status_code == code
    error = response.json()["error"]
    assert error["code"] == code
    assert error["status"] == "INVALID_ARGUMENT"
    assert isinstance(error["message"], str) and error["message"]
    assert server.deep()["cache"]["l1_entries"] == entries  # type: ignore[index]
    assert server.metric("router_decisions_total") == decisions


def test_a_body_that_stops_arriving_gets_a_408_after_the_request_timeout(server: Server) -> None:
    timeouts = server.metric("router_requests_total", route="/v1/query-classify", status="408")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /v1/query-classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text": "the rest never co'
        )
        client.settimeout(REQUEST_TIMEOUT_SEC + 10)
        start = time.monotonic()
        answer = client.recv(65536)
        waited = time.monotonic() - start
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
        while len(body) < length and (more := client.recv(65536)):  # head and body can come in separate segments
            body += more
        answer = head + b"\r\n\r\n" + body
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"status":"DEADLINE_EXCEEDED"' in answer
    assert REQUEST_TIMEOUT_SEC - 0.5 < waited < REQUEST_TIMEOUT_SEC + 5
    # Counted as what the client got (a 4xx: its doing), not as the cancellation that ended the handler.
    assert server.metric("router_requests_total", route="/v1/query-classify", status="408") == timeouts + 1
    assert server.classify("still answering after a timeout").status_code == 200


def test_the_limit_counts_the_text_as_sent(server: Server) -> None:
    """MAX_TEXT_CHARS (2048) counts every character sent, so the schema's maxLength is exactly the rule."""
    assert server.classify("  " + "z" * 2044 + "  ").status_code == 200
    assert server.classify("  " + "z" * 2045 + "  ").status_code == 422


def test_batch_route_answers_in_order_and_forms_batches(server: Server) -> None:
    batches = server.metric("router_batch_size_count")
    texts = [f"batch route text number {i}" for i in range(24)]
    response = httpx.post(f"{server.url}/v1/query-classify:batch", json={"texts": texts}, timeout=30)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 24
    assert all(r == {"label": "0", "confidence": pytest.approx(P_FAST, abs=1e-5)} for r in results)
    assert server.metric("router_batch_size_count") - batches < 24  # BentoML grouped them

    too_many = httpx.post(f"{server.url}/v1/query-classify:batch", json={"texts": ["a"] * 65})
    assert too_many.status_code == 422
    assert httpx.post(f"{server.url}/v1/query-classify:batch", json={"texts": []}).status_code == 422
    assert httpx.post(f"{server.url}/v1/query-classify:batch", json={"texts": ["ok", " "]}).status_code == 422


def test_concurrent_requests_share_forward_passes(server: Server) -> None:
    batches = server.metric("router_batch_size_count")
    texts = [f"concurrent unique text {i}" for i in range(32)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/query-classify", json={"text": t}) for t in texts))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 32
    assert server.metric("router_batch_size_count") - batches < 32


def test_identical_concurrent_misses_run_the_model_once(server: Server) -> None:
    batches = server.metric("router_batch_size_sum")

    async def send_same() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/v1/query-classify", json={"text": "same text"}) for _ in range(16))
            )

    assert all(r.status_code == 200 for r in asyncio.run(send_same()))
    assert server.metric("router_batch_size_sum") == batches + 1  # one text went through the model


def test_health_and_metrics(server: Server) -> None:
    probe = f"metrics probe {uuid.uuid4()}"  # a miss, then a hit: the labelled counters below exist once used
    assert [server.classify(probe).status_code for _ in range(2)] == [200, 200]
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/health/ready").json() == {"status": "ready"}
    deep = server.deep()
    assert deep["status"] == "ready"
    assert deep["worker"]["workers"] == 1  # type: ignore[index]
    workers_started = psutil.Process(server.process.pid).children(recursive=True)
    assert deep["worker"]["pid"] in [p.pid for p in workers_started]  # type: ignore[index]
    assert deep["model"]["source"] == "path" and deep["model"]["trained"] is True  # type: ignore[index]
    assert deep["model"]["labels"] == {"0": "0", "1": "1"}  # type: ignore[index]
    assert deep["cache"]["l2_configured"] is False  # type: ignore[index]
    # The test servers run one worker process (tests/conftest.py: serve) with TORCH_THREADS=1.
    workers, threads = Settings(service_workers=1, torch_threads=1).parallelism()
    assert deep["batching"] == {
        "max_batch_size": 32,
        "max_latency_ms": 1000,
        "workers": workers,
        "shed_delay_ms": 250,
        "threads_per_worker": threads,
    }
    # The tiny model ships no routing.json: the fallback applies, and /metrics says which threshold is in force.
    assert deep["routing"] == {"confidence_threshold": 0.99, "source": "fallback", "fast_label": "0", "slow_label": "1"}
    assert server.metric("router_confidence_threshold", source="fallback") == 0.99
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in (
        "router_requests_total",
        "router_request_duration_seconds_bucket",
        "router_cache_hits_total",
        "router_decisions_total",
        "router_prediction_confidence_bucket",
        "router_batch_size_bucket",
        "router_inference_duration_seconds_bucket",
        "router_model_ready",
        "router_requests_in_progress",
    ):
        assert name in metrics
    assert server.metric("router_model_ready") == 1
    assert server.metric("router_requests_total", route="/v1/query-classify", status="200") >= 1
    assert server.metric("router_requests_in_progress", route="/v1/query-classify") == 0


def test_unknown_paths_do_not_grow_the_metrics(server: Server) -> None:
    """A scanner's random URLs never add series (BentoML's own request metrics, labelled by path, are off)."""

    def series() -> set[str]:
        text = httpx.get(f"{server.url}/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

    httpx.get(f"{server.url}/scan-first")
    series()  # the first scrape adds the /metrics route's own series
    before = series()
    for i in range(30):
        assert httpx.get(f"{server.url}/scan-{i}-{uuid.uuid4().hex}").status_code == 404
    assert series() == before


ACCESS_LINE = re.compile(
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO router\.access: 127\.0\.0\.1:\d+ "(\w+) (\S+)" (\d{3}) (\d+\.\d{3})ms$'
)


def test_each_request_gets_an_access_line_except_probes_and_scrapes(server: Server) -> None:
    """The router's access log (BentoML's is off): client, request line as sent, status, server-side ms; BentoML's
    own routes too; none for the health probes and /metrics, which are polled."""
    tag = uuid.uuid4().hex
    text = f"Summarize the access log test {tag}"
    calls = [
        ("POST", f"/v1/query-classify?t={tag}-miss", {"text": text}),
        ("POST", f"/v1/query-classify?t={tag}-bad", {"txt": 1}),
        ("POST", f"/classify?t={tag}-bentoml", {"text": text}),
        ("GET", f"/no%0Asuch?t={tag}-unknown", None),
    ]
    sent = {path: httpx.request(method, f"{server.url}{path}", json=body) for method, path, body in calls}
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}?t={tag}-quiet").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        lines = [m for line in server.log().splitlines() if tag in line and (m := ACCESS_LINE.match(line))]
        if len(lines) >= len(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    logged = {m[2]: (m[1], int(m[3]), float(m[4])) for m in lines}
    assert set(logged) == set(sent)  # one line each (the %-encoded newline stays encoded), none for the quiet paths
    for path, response in sent.items():
        method, status, elapsed_ms = logged[path]
        assert (method, status) == (response.request.method, response.status_code)
        assert elapsed_ms >= float(response.headers["x-router-latency"])  # logged once the body is sent
    assert [logged[p][1] for p in sent] == [200, 422, 200, 404]


def test_bentoml_python_client(server: Server) -> None:
    with bentoml.SyncHTTPClient(server.url) as client:
        result = client.classify(text="Summarize the following article about rivers.")
        assert result == {"label": "0", "confidence": pytest.approx(P_FAST, abs=1e-5)}
        with pytest.raises(bentoml.exceptions.BentoMLException):
            client.classify(text="   ")


def test_threshold_routing_and_l2_shared_between_instances(
    server_factory: Callable[..., Any], fast_model: Path, redis_server: RedisServer
) -> None:
    """Instance A (default threshold 0.99) answers fast; B (0.999) reads A's raw answer from Redis, routes it slow."""
    common = {"MODEL_PATH": str(fast_model), "REDIS_URL": redis_server.url, "REDIS_KEY_PREFIX": "qr-test:"}
    with (
        server_factory(common) as a,
        server_factory({**common, "CONFIDENCE_THRESHOLD": "0.999"}) as b,
    ):
        assert a.classify("Is a tomato a fruit?").json()["label"] == "0"
        assert redis_server.wait_for_keys(1) == 1  # A's answer, written behind it
        response = b.classify("Is a tomato a fruit?").json()
        assert response == {"label": "1", "confidence": pytest.approx(P_FAST, abs=1e-5)}
        assert b.metric("router_cache_hits_total", level="l2") == 1
        assert b.metric("router_batch_size_count") == 0  # B never ran the model
        assert b.metric("router_decisions_total", model_label="0", routed_label="1") == 1
        assert b.classify("Is a tomato a fruit?").status_code == 200
        assert b.metric("router_cache_hits_total", level="l1") == 1  # the L2 hit filled L1
        assert b.deep()["cache"]["redis_reachable"] is True  # type: ignore[index]


def test_a_new_model_never_serves_old_answers(
    server_factory: Callable[..., Any], fast_model: Path, slow_model: Path, redis_server: RedisServer
) -> None:
    common = {"REDIS_URL": redis_server.url}
    with server_factory({**common, "MODEL_PATH": str(fast_model)}) as old:
        assert old.classify("Which model answers this?").json()["label"] == "0"
    with server_factory({**common, "MODEL_PATH": str(slow_model)}) as new:
        assert new.classify("Which model answers this?").json()["label"] == "1"
        assert new.metric("router_cache_hits_total", level="l2") == 0


def test_redis_stopped_mid_run_degrades_and_recovers(
    server_factory: Callable[..., Any], fast_model: Path, redis_server: RedisServer
) -> None:
    env = {"MODEL_PATH": str(fast_model), "REDIS_URL": redis_server.url, "REDIS_RETRY_SEC": "0.5"}
    with server_factory(env) as server:
        assert server.classify("before the outage").status_code == 200
        assert server.metric("router_redis_up") == 1
        redis_server.stop()
        responses = [server.classify(f"during the outage {i}") for i in range(10)]
        assert [r.status_code for r in responses] == [200] * 10
        assert all(r.json()["label"] == "0" for r in responses)
        assert server.metric("router_redis_errors_total") >= 1
        assert server.metric("router_redis_up") == 0
        assert server.deep()["cache"]["redis_reachable"] is False  # type: ignore[index]
        assert "L2 bypassed" in server.log()

        redis_server.start()  # same port, empty
        for i in range(40):  # the breaker lets a probe through after its back-off
            server.classify(f"after the outage {i}")
            if server.metric("router_redis_up") == 1:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert server.metric("router_redis_up") == 1
        assert "redis is back" in server.log()


def test_missing_model_path_stays_not_ready(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    with server_factory({"MODEL_PATH": str(tmp_path / "nothing-here")}, ready=False) as server:
        ready = server.wait_until_loaded()
        assert ready.status_code == 503
        assert ready.json()["status"] == "failed"
        assert "MODEL_PATH" in ready.json()["error"]
        response = server.classify("hello")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["status"] == "UNAVAILABLE"
        assert httpx.get(f"{server.url}/health/live").status_code == 200
        assert "model NOT loaded" in server.log()


def test_corrupt_model_stays_not_ready(server_factory: Callable[..., Any], tmp_path: Path, fast_model: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((fast_model / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with server_factory({"MODEL_PATH": str(broken)}, ready=False) as server:
        ready = server.wait_until_loaded()
        assert ready.status_code == 503
        assert "could not be loaded" in ready.json()["error"]


def test_api_key_guards_the_api_but_not_health_or_metrics(server_factory: Callable[..., Any], fast_model: Path) -> None:
    with server_factory({"MODEL_PATH": str(fast_model), "API_KEY": "s3cret"}) as server:
        denied = server.classify("hello")
        assert denied.status_code == 401
        assert denied.json()["error"]["status"] == "UNAUTHENTICATED"
        assert denied.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(
            f"{server.url}/v1/query-classify", json={"text": "hi"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        allowed = httpx.post(
            f"{server.url}/v1/query-classify", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert allowed.status_code == 200
        assert server.classify("hi").status_code == 401  # a cached text too: the guard is outside the cache
        assert server.metric("router_requests_total", route="/v1/query-classify", status="401") == 3  # and counted
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        with bentoml.SyncHTTPClient(server.url, token="s3cret") as client:
            assert client.classify(text="hi")["label"] == "0"

"""Several worker processes (SERVICE_WORKERS), as a server on more than one CPU runs by default: each worker answers,
/metrics counts them all, Redis (L2) is what they share, and a worker still loading holds requests instead of
refusing them."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import RedisServer, Server
from tests.hub_standin import running_hub, served_from_hub

pytestmark = pytest.mark.integration


def one_client_per_worker(server: Server, workers: int, stack: ExitStack) -> dict[int, httpx.Client]:
    """A keep-alive client on each worker, by pid: a connection stays with the worker that accepted it, and which
    worker accepts a new one is the kernel's choice, so connections are opened until each worker has one."""
    clients: dict[int, httpx.Client] = {}
    for _ in range(200):
        client = stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
        pid = int(client.get("/health/deep").json()["worker"]["pid"])
        clients.setdefault(pid, client)
        if len(clients) == workers:
            return clients
    raise AssertionError(f"200 connections reached {len(clients)} of {workers} workers")


async def workers_of_a_burst(url: str, connections: int) -> Counter[int]:
    """Open `connections` at once, as a load generator or a gateway's pool does, and ask each which worker holds it."""
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30)) for _ in range(connections)
        ]
        await asyncio.gather(*(c.get("/health/live") for c in clients))  # every connection open before any is asked
        answers = await asyncio.gather(*(c.get("/health/deep") for c in clients))
    return Counter(int(a.json()["worker"]["pid"]) for a in answers)


def classify(client: httpx.Client, text: str) -> dict[str, Any]:
    response = client.post("/v1/query-classify", json={"text": text})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_two_workers_both_answer_count_together_and_share_the_l2_cache(
    server_factory: Callable[..., Any], fast_model: Path, redis_server: RedisServer
) -> None:
    env = {"MODEL_PATH": str(fast_model), "SERVICE_WORKERS": "2", "REDIS_URL": redis_server.url}
    with server_factory(env) as server, ExitStack() as stack:
        clients = one_client_per_worker(server, 2, stack)
        started = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
        assert set(clients) <= started
        first, second = clients.values()
        deep = first.get("/health/deep").json()
        assert deep["worker"]["workers"] == 2 and deep["batching"]["workers"] == 1  # one pass each on 2 CPUs

        text = f"shared between workers {uuid.uuid4()}"
        answer = classify(first, text)  # a miss everywhere: the first worker's model answers, and writes L2
        assert redis_server.wait_for_keys(1) == 1
        l2_hits = server.metric("router_cache_hits_total", level="l2")
        assert classify(second, text) == answer  # the second worker's L1 is its own: its answer comes from L2
        assert server.metric("router_cache_hits_total", level="l2") == l2_hits + 1
        l1_hits = server.metric("router_cache_hits_total", level="l1")
        assert classify(second, text) == answer  # and is in its L1 now
        assert server.metric("router_cache_hits_total", level="l1") == l1_hits + 1

        # /metrics, answered by either worker, sums both: three answers, one forward pass.
        assert server.metric("router_requests_total", route="/v1/query-classify", status="200") == 3
        assert server.metric("router_batch_size_count") == 1
        metrics = httpx.get(f"{server.url}/metrics").text.splitlines()
        ready = [line for line in metrics if line.startswith("router_model_ready{")]
        assert len(ready) == 2 and all(line.endswith(" 1.0") for line in ready), ready  # one series per worker pid

        # Each worker listens on its own socket (router.workers), so a burst of connections spreads over both: 24/40
        # at worst in 20 tries, and 12 or fewer of 64 is a binomial tail of 3e-7 a side. On one shared socket, 6 of 20
        # bursts left 12 or fewer on one worker (64/0 three times).
        for _ in range(10):
            split = asyncio.run(workers_of_a_burst(server.url, 64))
            assert set(split) == set(clients) and min(split.values()) > 12, split


def test_a_request_to_a_worker_still_loading_waits_for_the_model(
    server_factory: Callable[..., Any], fast_model: Path, tmp_path: Path
) -> None:
    """Its workers load side by side and any of them may answer /health/ready: a request that reaches one still
    loading is held (up to LOAD_WAIT_SEC) and answered once the model is in, not refused."""
    with running_hub() as (hub, endpoint):
        hub.add_folder("acme/router-tiny", fast_model)
        hub.downloads_open.clear()  # the model's files stay on their way until the test opens them
        env = served_from_hub(endpoint, "acme/router-tiny", tmp_path / "cache")
        with server_factory(env, ready=False) as server:
            assert httpx.get(f"{server.url}/health/ready").json()["status"] == "loading"
            answers: list[httpx.Response] = []
            request = threading.Thread(target=lambda: answers.append(server.classify("Summarize: rivers flow.")))
            start = time.monotonic()
            request.start()
            time.sleep(1.0)
            assert not answers  # held while the download waits
            hub.downloads_open.set()
            request.join(timeout=30)
            assert answers[0].status_code == 200 and answers[0].json()["label"] == "0"
            assert time.monotonic() - start >= 1.0

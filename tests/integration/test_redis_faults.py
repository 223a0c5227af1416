"""Redis that is slow or answers with errors: every request still gets its answer, fast, and metrics show it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer

pytestmark = pytest.mark.integration


@contextmanager
def slow_proxy(upstream_port: int, delay: float) -> Iterator[int]:
    """A TCP proxy on a free loopback port that holds every chunk `delay` seconds in both directions."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                time.sleep(delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            target.close()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_slow_redis_is_bypassed_within_the_timeout(
    server_factory: Callable[..., Any], fast_model: Path, redis_server: RedisServer
) -> None:
    with slow_proxy(redis_server.port, delay=0.5) as port:
        env = {"MODEL_PATH": str(fast_model), "REDIS_URL": f"redis://127.0.0.1:{port}/0", "REDIS_TIMEOUT_MS": "50"}
        with server_factory(env) as server:
            latencies = []
            for i in range(10):
                start = time.perf_counter()
                response = server.classify(f"slow redis query {i}")
                latencies.append(time.perf_counter() - start)
                assert response.status_code == 200 and response.json()["label"] == "0"
            assert max(latencies) < 0.4  # never waits for the 0.5 s Redis
            assert server.metric("router_redis_errors_total") >= 1
            assert server.metric("router_redis_up") == 0
            # The breaker is open: later requests skip Redis instead of paying the timeout each time.
            assert server.metric("router_redis_errors_total") <= 2


def test_redis_answering_errors_never_fails_a_request(
    server_factory: Callable[..., Any], fast_model: Path, redis_server: RedisServer
) -> None:
    admin = redis.Redis(port=redis_server.port)
    admin.config_set("maxmemory", "1")
    admin.config_set("maxmemory-policy", "noeviction")  # every SET now answers "OOM command not allowed"
    env = {"MODEL_PATH": str(fast_model), "REDIS_URL": redis_server.url, "REDIS_RETRY_SEC": "0.2"}
    with server_factory(env) as server:
        for i in range(5):
            assert server.classify(f"oom query {i}").status_code == 200
            time.sleep(0.25)  # past the back-off: the next SET probes Redis again
        assert server.metric("router_redis_errors_total", operation="set") >= 2
        assert "L2 bypassed" in server.log()
        admin.config_set("maxmemory", "0")  # Redis recovers; the next probe closes the breaker
        time.sleep(0.25)
        assert server.classify("after recovery").status_code == 200
        assert server.metric("router_redis_up") == 1
        assert admin.dbsize() >= 1
    admin.close()


def test_redis_down_at_start_then_started_is_picked_up(
    server_factory: Callable[..., Any], fast_model: Path, redis_server: RedisServer
) -> None:
    redis_server.stop()  # nothing listens on its port when the service starts
    env = {"MODEL_PATH": str(fast_model), "REDIS_URL": redis_server.url, "REDIS_RETRY_SEC": "0.2"}
    with server_factory(env) as server:  # becomes ready without Redis
        for i in range(5):
            response = server.classify(f"no redis yet {i}")
            assert response.status_code == 200 and response.json()["label"] == "0"
        assert server.metric("router_redis_up") == 0
        redis_server.start()
        for i in range(40):  # the breaker's next probe finds it
            server.classify(f"redis started {i}")
            if server.metric("router_redis_up") == 1:
                break
            time.sleep(0.1)
        assert server.metric("router_redis_up") == 1
        assert redis_server.wait_for_keys(1) >= 1  # L2 is being filled now

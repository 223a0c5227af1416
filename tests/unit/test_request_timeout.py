"""REQUEST_TIMEOUT_SEC: `router.api.RequestTimeout`, which the service puts in place of BentoML's TimeoutMiddleware.

Driven as ASGI, on real asyncio loops: the middleware is what runs in the server (the server-level test is in
tests/integration/test_service.py)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
from typing import Any

import pytest
from bentoml._internal.server.http import traffic
from starlette.types import Message, Receive, Scope, Send

import service  # noqa: F401  (importing the service installs RequestTimeout)
from router.api import RequestTimeout

REQUEST = {"type": "http.request", "body": b'{"text": "hi"}', "more_body": False}


async def answer_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, body: list[Message]) -> list[Message]:
    """One request through `app`; `body` are the messages the client sends (then it waits, like a stalled client)."""
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    for message in body:
        incoming.put_nowait(message)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/v1/query-classify"}, incoming.get, send)
    return sent


def armed_timers() -> int:
    return sum(type(o) is asyncio.TimerHandle and not o.cancelled() for o in gc.get_objects())


def test_the_service_builds_its_app_with_request_timeout() -> None:
    assert traffic.TimeoutMiddleware is RequestTimeout


def bentomls_timeout_middleware() -> Any:
    """BentoML's own class, from a fresh copy of its module (the service replaced the name in the loaded one)."""
    spec = importlib.util.spec_from_file_location("bentoml_traffic_copy", traffic.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TimeoutMiddleware


def timers_left_by_100_answers(middleware: Any) -> int:
    async def hundred_requests() -> int:
        app = middleware(answer_at_once, timeout=30)
        before = armed_timers()
        for _ in range(100):
            assert (await call(app, [REQUEST]))[0]["status"] == 200
        return armed_timers() - before

    return asyncio.run(hundred_requests())


def test_answered_requests_leave_no_timer_behind() -> None:
    assert timers_left_by_100_answers(RequestTimeout) == 0


def test_bentomls_own_middleware_keeps_a_timer_per_answered_request() -> None:
    """Why the service replaces it: every answered request left a timer armed for the whole timeout."""
    assert timers_left_by_100_answers(bentomls_timeout_middleware()) == 100


def test_a_stalled_body_gets_a_408_in_the_error_shape() -> None:
    app = RequestTimeout(answer_at_once, timeout=0.05)
    sent = asyncio.run(call(app, []))  # the client never sends its body
    assert sent[0]["status"] == 408
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == 408 and error["status"] == "DEADLINE_EXCEEDED"
    assert "request body" in error["message"]


def test_an_answer_that_never_starts_gets_a_504() -> None:
    async def never_answers(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await asyncio.sleep(10)

    sent = asyncio.run(call(RequestTimeout(never_answers, timeout=0.05), [REQUEST]))
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"])["error"]["status"] == "DEADLINE_EXCEEDED"


def test_an_answer_that_has_started_is_not_cut_off() -> None:
    async def slow_body(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.1)  # twice the timeout, after the answer started
        await send({"type": "http.response.body", "body": b"done"})

    sent = asyncio.run(call(RequestTimeout(slow_body, timeout=0.05), [REQUEST]))
    assert [m.get("status") or m.get("body") for m in sent] == [200, b"done"]


def test_a_timeout_error_of_the_app_itself_is_not_answered_as_a_timeout() -> None:
    async def times_out_on_its_own(scope: Scope, receive: Receive, send: Send) -> None:
        raise TimeoutError("a client library's own timeout")

    with pytest.raises(TimeoutError, match="own timeout"):
        asyncio.run(call(RequestTimeout(times_out_on_its_own, timeout=30), [REQUEST]))

"""The HTTP contract: request/response models, the JSON error shape, and the body-size limit.

Errors always look like `{"error": {"code": 400|413|415|422|..., "status": "INVALID_ARGUMENT", "message": "..."}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from bentoml._internal.server.http import traffic  # pinned: bentoml==1.4.40 (use_request_timeout)
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.config import Settings
from router.logs import AccessLog

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ApiError(Exception):
    """An error with an HTTP status that the handlers below turn into the JSON error shape."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers


def error_response(code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "status": STATUS_NAMES.get(code, "UNKNOWN"), "message": message}}
    return JSONResponse(body, status_code=code, headers=headers)


# "Not only whitespace" as a JSON-schema pattern, spelled out: `\S` means different sets in ECMA, Rust and Python
# regexes. These are the characters str.isspace() (so str.strip(), which check_text uses) counts as whitespace.
NOT_ONLY_WHITESPACE = r"[^\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def check_text(text: str, max_chars: int) -> str:
    """Trimmed text, from a text of 1..max_chars characters with one that is not whitespace, valid as UTF-8.

    The limit counts the text as sent, so the OpenAPI schema (maxLength, pattern) states exactly what is accepted.
    """
    if len(text) > max_chars:
        raise ValueError(f"text has {len(text)} characters; the limit is {max_chars}")
    trimmed = text.strip()
    if not trimmed:
        raise ValueError("text must not be empty or whitespace only")
    try:
        trimmed.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from exc
    return trimmed


def request_models(max_chars: int, max_texts: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request models bound to the configured limits (so the OpenAPI schema shows the real ones)."""
    Text = Annotated[
        str,
        Field(min_length=1, max_length=max_chars, json_schema_extra={"pattern": NOT_ONLY_WHITESPACE}),
        AfterValidator(lambda t: check_text(t, max_chars)),
    ]

    class ClassifyRequest(BaseModel):
        text: Text = Field(description=f"The query: 1..{max_chars} characters, not only whitespace.")
        request_id: Annotated[str, Field(max_length=128)] | None = Field(None, description="Echoed back.")

    class ClassifyBatchRequest(BaseModel):
        texts: list[Text] = Field(min_length=1, max_length=max_texts, description=f"1..{max_texts} queries.")

    return ClassifyRequest, ClassifyBatchRequest


class Classification(BaseModel):
    label: str = Field(description='Routed label: "0" fast path, "1" slow path.')
    confidence: float = Field(ge=0.0, le=1.0, description="Softmax probability of the model's own top label.")
    request_id: str | None = Field(None, description="The request's request_id, when it had one.")


class ClassificationBatch(BaseModel):
    results: list[Classification]


class ErrorDetail(BaseModel):
    code: int = Field(description="The HTTP status code.")
    status: str = Field(description="Its name, e.g. INVALID_ARGUMENT, UNAVAILABLE.")
    message: str = Field(description="What was wrong, for a person.")


class ErrorBody(BaseModel):
    """The one shape of every error answer (`error_response`)."""

    error: ErrorDetail


ERROR_REASONS = {
    400: "The body is not valid JSON.",
    401: "API_KEY is set and the Authorization: Bearer header is missing or wrong.",
    408: "The request body had not all arrived after REQUEST_TIMEOUT_SEC.",
    413: "The body is larger than MAX_BODY_BYTES.",
    415: "Content-Type is not JSON.",
    422: "The body does not match the request schema.",
    500: "Inference failed for this text.",
    503: "The model is not ready, or the service is overloaded (see Retry-After).",
    504: "No answer had started after REQUEST_TIMEOUT_SEC.",
}
# OpenAPI `responses` of the classify routes, all in the ErrorBody shape (FastAPI's own 422 included).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": reason} for code, reason in ERROR_REASONS.items()
}


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "request body is not valid JSON")
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return error_response(422, "; ".join(parts))


async def http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


async def api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message, headers=exc.headers)


def is_json(content_type: bytes) -> bool:
    media_type = content_type.split(b";")[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


class BodyRules:
    """ASGI middleware for request bodies: POSTs to `json_paths` must be JSON (else 415, before the body is parsed),
    and bodies over `max_bytes` get a 413 before they are read whole (declared or streamed).

    A middleware rather than a FastAPI dependency: resolving one cost the cache-hit path more than the check itself.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, json_paths: Iterable[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.json_paths = frozenset(json_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await error_response(413, f"request body is larger than {self.max_bytes} bytes")(scope, receive, send)
            return
        if (
            scope["method"] == "POST"
            and scope["path"] in self.json_paths
            and not is_json(headers.get(b"content-type", b""))
        ):
            await error_response(415, "Content-Type must be application/json")(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, f"request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


class RequestObserver:
    """ASGI middleware: `x-router-latency` (server-side ms) on every response, request count and latency metrics, and
    the access log (router.logs.AccessLog): a line per request, except for `quiet_paths`.

    Paths outside `routes` are counted as "other" so clients cannot grow the metric's label set (BentoML's own request
    metrics label by raw path, which is why the service turns them off). BentoML's access log is off too: the router's
    costs less (router.logs.AccessLog says why).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Any,
        routes: frozenset[str],
        access_log: AccessLog | None,
        quiet_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.access_log = access_log
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500
        in_progress = self.metrics.in_progress.labels(route)
        in_progress.inc()

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - start) * 1000
                message["headers"] = [*message.get("headers", []), (b"x-router-latency", f"{elapsed_ms:.2f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except asyncio.CancelledError:
            deadline: RequestDeadline | None = scope.get(RequestTimeout.SCOPE_KEY)
            if deadline is not None and (timed_out := deadline.status()):
                status = timed_out  # RequestTimeout (outside this middleware) answers it
            raise
        finally:
            elapsed = time.perf_counter() - start
            in_progress.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(elapsed)
            if self.access_log is not None and scope["path"] not in self.quiet_paths:
                self.access_log.request(scope, status, elapsed * 1000)


class CacheHits:
    """ASGI middleware: answers a JSON POST to `path` itself when `lookup(body)` has the answer (an L1 hit), and
    hands every other request on, with its body, to the app.

    A cache hit is a dictionary look-up; through FastAPI it also paid for routing, the dependency machinery, body
    parsing and validating the response: about a fifth of a hit's CPU, and skipping it gave 1.1-1.4x the hits/s.
    The service puts it around BentoML's app (inside the API key check), so a hit also skips BentoML's request
    context, its router and the mount of the FastAPI app: 1.5x the hits/s again (docs/performance.md). `lookup`
    validates the body with the route's own request model (pydantic's JSON mode): whatever it does not accept, or
    any doubt (no declared length, not JSON, over `max_bytes`), goes on to the app, which answers or refuses it as
    before.
    """

    def __init__(self, app: ASGIApp, path: str, max_bytes: int, lookup: Callable[[bytes], Response | None]) -> None:
        self.app = app
        self.path = path
        self.max_bytes = max_bytes
        self.lookup = lookup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if not declared.isdigit() or int(declared) > self.max_bytes or not is_json(headers.get(b"content-type", b"")):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: the app sees it
            body += message.get("body", b"")
            if not message.get("more_body", False):
                response = self.lookup(body)
                if response is not None:
                    await response(scope, receive, send)
                    return
                break
        replay = iter(messages)

        async def replay_receive() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replay_receive, send)


CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client hung up before the answer": never sent, only recorded


class CancelOnDisconnect:
    """ASGI middleware: when a client hangs up before its answer is sent, stop working on its request.

    uvicorn keeps running a handler whose client has gone. Under overload, clients time out and retry, and the model
    would spend its forward passes on answers nobody reads. From WATCH_AFTER_S after the body is read, this middleware
    waits for uvicorn's `http.disconnect` and cancels the handler: its texts leave the batch queue (router.batching)
    and the request is recorded (access log, metrics) with status 499.
    """

    WATCH_AFTER_S = 0.05  # an answer sooner than this has nothing left to cancel; a cache hit takes ~0.1 ms

    def __init__(self, app: ASGIApp, paths: Iterable[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = asyncio.current_task()
        if scope["type"] != "http" or scope["path"] not in self.paths or handler is None:
            await self.app(scope, receive, send)
            return
        answered = client_gone = False
        watcher: asyncio.Task[Message] | None = None
        timer: asyncio.TimerHandle | None = None

        async def watch() -> Message:
            nonlocal client_gone
            message = await receive()  # blocks until the client disconnects or the response is complete
            if message["type"] == "http.disconnect" and not answered:
                client_gone = True
                handler.cancel()
            return message

        def watching() -> asyncio.Task[Message]:
            """The watcher, started WATCH_AFTER_S after the body: a task per request made a cache hit 111 us, not 99."""
            nonlocal watcher
            if watcher is None:
                watcher = asyncio.ensure_future(watch())
            return watcher

        async def body_receive() -> Message:
            nonlocal timer
            if timer is not None:  # the app asks again once the body is read: it gets the watcher's message
                timer.cancel()
                return await asyncio.shield(watching())
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                timer = asyncio.get_running_loop().call_later(self.WATCH_AFTER_S, watching)
            return message

        async def answer_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await self.app(scope, body_receive, answer_send)
        except asyncio.CancelledError:
            if not client_gone or handler.cancelling() > 1:  # not (only) ours: the server is shutting down
                raise
            handler.uncancel()
            # uvicorn drops whatever is sent to a closed connection; the outer middlewares see the status.
            await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        finally:
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()


class ApiKeyGuard:
    """ASGI middleware: with API_KEY set, every route but health and metrics needs `Authorization: Bearer <key>`.

    Health and metrics stay open so probes and Prometheus need no secret; the comparison is constant-time.
    """

    OPEN_PREFIXES = ("/health/", "/metrics", "/livez", "/readyz", "/healthz")

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            headers = {"WWW-Authenticate": "Bearer"}
            await error_response(401, "missing or wrong API key (Authorization: Bearer ...)", headers)(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)


@dataclass
class RequestDeadline:
    """One request's REQUEST_TIMEOUT_SEC: `RequestTimeout` keeps it in the ASGI scope, `RequestObserver` reads it."""

    timeout: asyncio.Timeout
    body_received: bool = False

    def status(self) -> int | None:
        """The status the request gets once its deadline passed, else None: 408 when the client had not finished
        sending its body (the client's doing, not a server error that pages anyone), else 504."""
        if not self.timeout.expired():
            return None
        return 504 if self.body_received else 408


class RequestTimeout:
    """ASGI middleware that stands in for BentoML's `TimeoutMiddleware` (the service's `traffic.timeout`): when no
    answer has started within `timeout` seconds, a 408 if the request body had not all arrived, else a 504.

    BentoML 1.4.40's own arms a `call_later` timer per request and never cancels it, so every answered request keeps a
    timer, a future and a bound method in the event loop for the whole timeout: 150,000 of each at 5,000 cache hits/s
    and 30 s. The garbage collector walks them on each full collection, and those pauses (60-140 ms) were the cache
    hits' p99 (docs/performance.md). This one uses `asyncio.timeout` and disarms it when the answer starts.
    """

    SCOPE_KEY = "router.deadline"

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = RequestDeadline(asyncio.timeout(self.timeout))
        scope[self.SCOPE_KEY] = deadline  # so RequestObserver records the 408/504, not the cancellation's 500

        async def body_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                deadline.body_received = True
            return message

        async def started_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                deadline.timeout.reschedule(None)  # from here on it cannot expire, so status() stays None
            await send(message)

        try:
            async with deadline.timeout:
                await self.app(scope, body_receive, started_send)
        except TimeoutError:
            status = deadline.status()
            if status is None:  # the app's own TimeoutError, or one after the answer started: not ours to answer
                raise
            what = "answer" if status == 504 else "complete request body"
            await error_response(status, f"no {what} within {self.timeout:g} s")(scope, receive, send)


def use_request_timeout() -> None:
    """Make BentoML build its apps with `RequestTimeout` in place of its own `TimeoutMiddleware` (it imports the class
    when it builds the app, so this must run before: at import of the service module)."""
    traffic.TimeoutMiddleware = RequestTimeout  # type: ignore[misc,assignment]


def service_options(settings: Settings, routes: Iterable[str]) -> dict[str, Any]:
    """`@bentoml.service` options of the router; bench/trivial.py uses them too, so its ceiling is a fair reference.

    BentoML wraps every request in an OpenTelemetry span even when no exporter is configured; that cost a third of
    the CPU of a cached answer, so `routes` are traced only with TRACE_REQUESTS. BentoML's request metrics label every
    series with the raw request path, so each unknown URL a scanner tries would add series for good: they are off,
    and the router's own metrics (router.metrics, bounded labels) serve /metrics.
    """
    return {
        "workers": settings.processes(),
        "threads": 1,
        "traffic": {"timeout": settings.request_timeout_sec},
        "tracing": {"excluded_urls": [] if settings.trace_requests else sorted(routes)},
        "metrics": {"enabled": False},
        "logging": {"access": {"enabled": False}},  # the router writes its own (RequestObserver)
    }

"""Query Router: the BentoML service. Wiring only; the work is done in `router/`.

One service, one process per worker. The HTTP routes (FastAPI, mounted on BentoML's app) hand each cache miss to
BentoML's adaptive batcher in-process (`router.batching`), so concurrent requests share forward passes without a
second process or a network hop; `predict` is the same model call as a batchable BentoML API for bulk callers.
README § Architecture says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from typing import Any, NoReturn

import bentoml
from _bentoml_sdk.service import get_current_service  # pinned: bentoml==1.4.40
from bentoml._internal.context import server_context  # pinned: bentoml==1.4.40
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from router.api import (
    ERROR_RESPONSES,
    ApiError,
    ApiKeyGuard,
    BodyRules,
    CacheHits,
    CancelOnDisconnect,
    Classification,
    ClassificationBatch,
    RequestObserver,
    api_error,
    check_text,
    http_error,
    request_models,
    service_options,
    use_request_timeout,
    validation_error,
)
from router.batching import AdaptiveBatcher, Overloaded
from router.cache import Breaker, SingleFlight, TwoLevelCache, connect_redis
from router.config import Settings
from router.inference import Classifier
from router.logs import AccessLog, configure_logging
from router.metrics import RouterMetrics, exposition
from router.model import ModelSource, resolve_model, shipped_threshold
from router.routing import Prediction, Threshold, pick_threshold, route
from router.text import cache_key, normalize
from router.workers import spread_connections

log = logging.getLogger("service")

# Read at import: BentoML takes the batching parameters when the class below is defined.
settings = Settings()
# In a BentoML worker process, before BentoML hands the listening socket to uvicorn (router.workers says why).
spread_connections(settings.processes(), server_context.worker_index, sys.argv)
ClassifyRequest, ClassifyBatchRequest = request_models(settings.max_text_chars, settings.max_batch_texts)
# A query of typical length (~60 tokens) for the batcher's first cost estimate; real passes refine it.
CALIBRATION_TEXT = (
    "Summarize the following paragraph for a busy reader in two sentences, keeping the names, the dates and the "
    "numbers exactly as they are written, and leave out any opinion that the author states about the events."
)
LOAD_WAIT_SEC = 10.0  # how long a request waits for a worker still loading (QueryRouter.wait_for_model)
CLASSIFY_ROUTES = ("/v1/query-classify", "/v1/query-classify:batch")
ROUTES = frozenset({*CLASSIFY_ROUTES, "/health/live", "/health/ready", "/health/deep", "/metrics"})
OBSERVED_ROUTES = ROUTES | {"/classify", "/internal/predict"}  # route labels (else "other"); traced on request only
QUIET_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})  # polled by probes and Prometheus: not logged

http = FastAPI(title="Query Router", version="1", openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None)
http.add_exception_handler(RequestValidationError, validation_error)
http.add_exception_handler(HTTPException, http_error)
http.add_exception_handler(ApiError, api_error)
http.add_middleware(BodyRules, max_bytes=settings.max_body_bytes, json_paths=CLASSIFY_ROUTES)
http.add_middleware(CancelOnDisconnect, paths=CLASSIFY_ROUTES)
metrics = RouterMetrics()  # prometheus_client objects are process-wide; BentoML's /metrics serves them


def answer_from_cache(body: bytes) -> Response | None:
    """A /v1/query-classify body's answer when L1 has it (router.api.CacheHits), else None: the app takes it."""
    try:
        request = ClassifyRequest.model_validate_json(body)
    except ValidationError:
        return None
    result = the_service().cached_answer(request.text)  # type: ignore[attr-defined]
    if result is None:
        return None
    result.request_id = request.request_id  # type: ignore[attr-defined]
    return JSONResponse(result.model_dump(exclude_none=True))


use_request_timeout()  # REQUEST_TIMEOUT_SEC without BentoML's timer per request (router.api.RequestTimeout)


@bentoml.service(name="query_router", **service_options(settings, sorted(OBSERVED_ROUTES)))
@bentoml.asgi_app(http, path="/")
class QueryRouter:
    def __init__(self) -> None:
        configure_logging(settings)
        self.settings = settings
        self.metrics = metrics
        redis = connect_redis(settings.redis_url, settings.redis_timeout_ms / 1000) if settings.redis_url else None
        self.cache = TwoLevelCache(
            self.metrics,
            l1_size=settings.cache_l1_size,
            l1_ttl_sec=settings.cache_l1_ttl_sec,
            redis=redis,
            l2_ttl_sec=settings.cache_l2_ttl_sec,
            key_prefix=settings.redis_key_prefix,
            timeout_sec=settings.redis_timeout_ms / 1000,
            breaker=Breaker(settings.redis_retry_sec),
        )
        self.flights = SingleFlight()
        self.waiting = 0  # cache misses in flight (admission control: MAX_QUEUE)
        self.batcher: AdaptiveBatcher[Prediction] = AdaptiveBatcher(
            self.predict_texts, settings.max_batch_size, settings.max_latency_ms, workers=settings.parallelism()[0]
        )
        self.source: ModelSource | None = None
        self.classifier: Classifier | None = None
        self.threshold: Threshold | None = None
        self.load_error: str | None = None
        self.metrics.model_ready.set(0)

    # --- lifecycle -------------------------------------------------------------------------------------------

    @bentoml.on_startup
    async def start_loading(self) -> None:
        """Load in the background so /health/live answers (and /health/ready says 503) while the model loads."""
        self.loading = asyncio.create_task(asyncio.to_thread(self._load))

    def _load(self) -> None:
        try:
            self.source = resolve_model(self.settings)
            threshold = pick_threshold(self.settings.confidence_threshold, shipped_threshold(self.source.path))
            classifier = Classifier.load(self.source, self.settings)
            classifier.warm_up()
            self.batcher.calibrate(classifier.predict, CALIBRATION_TEXT)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model NOT loaded, service stays not ready: %s", self.load_error)
            return
        self.threshold = threshold
        self.classifier = classifier
        # Everything loaded so far (torch, transformers, the model) lives as long as the process: keep it out of the
        # collector, whose full passes over it stalled a request for ~240 ms every few hundred requests.
        gc.collect()
        gc.freeze()
        # Full collections still walk what came after: a full L1 cache (10,000 entries) took ~4 ms a walk. Every 10
        # young collections (the default) that was 3 walks a second under cache hits, prompted by the objects of the
        # requests in flight, which die young anyway; every 100, one in 3 s (docs/performance.md, GC).
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, 100)
        self.metrics.model_ready.set(1)
        src = self.source
        self.metrics.model_info.labels(src.origin, src.name, classifier.identity, str(src.trained).lower()).set(1)
        self.metrics.confidence_threshold.labels(threshold.source).set(threshold.value)
        log.info(
            "model ready: source=%s name=%s revision=%s identity=%s device=%s trained=%s labels=%s threshold=%s (%s)",
            src.origin,
            src.name,
            src.revision,
            classifier.identity,
            self.settings.model_device,
            src.trained,
            classifier.labels,
            threshold.value,
            threshold.source,
        )

    @bentoml.on_shutdown
    async def close(self) -> None:
        self.batcher.shutdown()
        await self.cache.close()

    def __is_ready__(self) -> bool:
        return self.classifier is not None

    @property
    def load_status(self) -> str:
        """What /health/ready and /health/deep report: "ready", "failed" (see load_error) or "loading"."""
        if self.classifier is not None:
            return "ready"
        return "failed" if self.load_error else "loading"

    # --- the model, batched by BentoML ---------------------------------------------------------------------------

    @bentoml.api(
        route="/internal/predict",
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )
    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """Raw model predictions (no cache, no routing) for already normalized texts."""
        return [{"label": p.label, "confidence": p.confidence} for p in self.predict_texts(texts)]

    def predict_texts(self, texts: list[str]) -> list[Prediction]:
        """One forward pass over a batch; runs in a worker thread (BentoML's or the batcher's)."""
        if self.classifier is None:
            raise bentoml.exceptions.ServiceUnavailable("model not ready")
        with self.metrics.inference_duration.time():
            predictions = self.classifier.predict(texts)
        self.metrics.batch_size.observe(len(texts))
        return predictions

    # --- the answer for one text: L1 → (single-flight: L2 → model) → routing -----------------------------------

    async def wait_for_model(self) -> tuple[Classifier, Threshold]:
        """Hold a request that reaches this worker while its model loads, up to LOAD_WAIT_SEC, rather than refuse it.

        A server's workers load side by side, and the first to finish answers /health/ready for the whole server
        when it takes the probe: on a first start one worker exports the ONNX graph while the others wait to read
        it, seconds later."""
        if self.load_error is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.loading), LOAD_WAIT_SEC)
        if self.classifier is None or self.threshold is None:
            raise ApiError(503, "model not ready", headers={"Retry-After": "5"})
        return self.classifier, self.threshold

    async def answer(self, text: str) -> Classification:
        classifier, threshold = self.classifier, self.threshold
        if classifier is None or threshold is None:
            classifier, threshold = await self.wait_for_model()
        normalized = normalize(text)
        key = cache_key(classifier.identity, normalized)
        prediction = self.cache.get_l1(key)
        if prediction is None:
            if self.waiting >= self.settings.max_queue:  # shed now rather than queue past the latency budget
                await self.shed("overloaded: too many queries waiting for the model")
            self.waiting += 1
            try:
                prediction = await self.flights.run(key, lambda: self._fetch(key, normalized))
            finally:
                self.waiting -= 1
        return self.routed(prediction, threshold)

    def cached_answer(self, text: str) -> Classification | None:
        """The answer from L1, or None (a miss is not counted here: `answer` follows and counts it)."""
        classifier, threshold = self.classifier, self.threshold
        if classifier is None or threshold is None:
            return None
        prediction = self.cache.get_l1(cache_key(classifier.identity, normalize(text)), count_miss=False)
        return None if prediction is None else self.routed(prediction, threshold)

    def routed(self, prediction: Prediction, threshold: Threshold) -> Classification:
        routed = route(prediction, threshold.value, self.settings.fast_label, self.settings.slow_label)
        self.metrics.decisions.labels(prediction.label, routed).inc()
        self.metrics.confidence.observe(prediction.confidence)
        return Classification(label=routed, confidence=round(prediction.confidence, 6))

    async def shed(self, message: str) -> NoReturn:
        """Refuse a cache miss the model has no room for, after SHED_DELAY_MS.

        The pause costs no CPU, and it paces clients that retry at once whatever `Retry-After` says: with instant
        refusals, 150 such clients on the AVX2 machine got 82-88 answers/s out of a capacity of ~130, because the
        refusals (8,000 in 15 s) took the event loop's CPU; with 250 ms, 137/s and 369 refusals (README § Reliability).
        """
        self.metrics.shed.inc()
        await asyncio.sleep(self.settings.shed_delay_ms / 1000)
        raise ApiError(503, message, {"Retry-After": "1"})

    async def _fetch(self, key: str, normalized: str) -> Prediction:
        cached = await self.cache.get_l2(key)
        if cached is not None:
            return cached
        try:
            prediction = await self.batcher.run(normalized)
        except Overloaded:
            await self.shed("overloaded: the model queue is full, retry shortly")
        except Exception as exc:
            log.exception("inference failed")
            raise ApiError(500, "inference failed") from exc
        self.cache.put(key, prediction)
        return prediction

    # --- BentoML-native API (for bentoml.SyncHTTPClient / AsyncHTTPClient) -----------------------------------

    @bentoml.api(route="/classify")
    async def classify(self, text: str) -> dict[str, Any]:
        """Same answer as POST /v1/query-classify, for BentoML's Python clients: `client.classify(text=...)`."""
        try:
            checked = check_text(text, self.settings.max_text_chars)
        except ValueError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from exc
        try:
            return (await self.answer(checked)).model_dump(exclude_none=True)
        except ApiError as exc:
            if exc.code == 503:
                raise bentoml.exceptions.ServiceUnavailable(exc.message) from exc
            raise


def the_service() -> QueryRouter:
    """The service instance, for the HTTP routes.

    The routes are module functions that call this, not methods: BentoML gives a route method's `self` the sync
    dependency `get_current_service`, which FastAPI runs in its thread pool, a thread hop and a loop wake-up on every
    request, and resolving any dependency cost a cache hit more than the lookup (docs/performance.md).
    """
    return get_current_service()  # type: ignore[no-any-return]


# --- HTTP API (module functions, not methods: see the_service) ------------------------------------------------


@http.post(
    "/v1/query-classify",
    response_model=Classification,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
)
async def query_classify(body: ClassifyRequest) -> Classification:  # type: ignore[valid-type]
    """Classify one query: label "0" (fast path) or "1" (slow path) and the model's confidence."""
    result = await the_service().answer(body.text)  # type: ignore[attr-defined]
    result.request_id = body.request_id  # type: ignore[attr-defined]
    return result


@http.post(
    "/v1/query-classify:batch",
    response_model=ClassificationBatch,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
)
async def query_classify_batch(body: ClassifyBatchRequest) -> ClassificationBatch:  # type: ignore[valid-type]
    """Classify up to MAX_BATCH_TEXTS queries; they join the same adaptive batches as single requests."""
    service = the_service()
    results = await asyncio.gather(*(service.answer(t) for t in body.texts))  # type: ignore[attr-defined]
    return ClassificationBatch(results=list(results))


@http.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@http.get("/health/ready")
async def ready() -> JSONResponse:
    service = the_service()
    if service.load_status == "ready":
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": service.load_status, "error": service.load_error}, status_code=503)


@http.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus text format; collecting reads every worker's files, so it runs off the event loop."""
    return Response(await asyncio.to_thread(exposition), media_type=CONTENT_TYPE_LATEST)


@http.get("/health/deep")
async def deep() -> dict[str, Any]:
    service = the_service()
    src, clf = service.source, service.classifier
    return {
        "status": service.load_status,
        "error": service.load_error,
        "worker": {"pid": os.getpid(), "workers": service.settings.processes()},  # this answer's worker process
        "model": {
            "source": src.origin if src else None,
            "name": src.name if src else None,
            "path": str(src.path) if src else None,
            "revision": src.revision if src else None,
            "trained": src.trained if src else None,
            "identity": clf.identity if clf else None,
            "labels": clf.labels if clf else None,
            "device": service.settings.model_device,
            "backend": service.settings.model_backend,
            "max_length": service.settings.max_length,
        },
        "cache": {
            "l1_entries": len(service.cache.l1) if service.cache.l1 is not None else 0,
            "l1_max_size": service.settings.cache_l1_size,
            "l1_ttl_sec": service.settings.cache_l1_ttl_sec,
            "l2_configured": service.cache.redis is not None,
            "redis_reachable": await service.cache.redis_reachable(),
        },
        "batching": {
            "max_batch_size": service.settings.max_batch_size,
            "max_latency_ms": service.settings.max_latency_ms,
            "workers": service.batcher.workers,
            "shed_delay_ms": service.settings.shed_delay_ms,
            "threads_per_worker": service.settings.parallelism()[1],
        },
        "routing": {
            "confidence_threshold": service.threshold.value if service.threshold else None,
            "source": service.threshold.source if service.threshold else None,
            "fast_label": service.settings.fast_label,
            "slow_label": service.settings.slow_label,
        },
    }


# Around BentoML's whole app, so its own routes (the batchable /classify) are counted and logged too.
QueryRouter.add_asgi_middleware(  # type: ignore[attr-defined]
    RequestObserver,
    metrics=metrics,
    routes=OBSERVED_ROUTES,
    access_log=AccessLog(json_lines=settings.log_format == "json") if settings.access_log else None,
    quiet_paths=QUIET_PATHS,
)
if settings.api_key:  # the whole app, BentoML's routes included; health and metrics stay open
    QueryRouter.add_asgi_middleware(ApiKeyGuard, api_key=settings.api_key)  # type: ignore[attr-defined]
# Inside the key check, before BentoML's request context and routing: a hit needs neither.
QueryRouter.add_asgi_middleware(  # type: ignore[attr-defined]
    CacheHits, path="/v1/query-classify", max_bytes=settings.max_body_bytes, lookup=answer_from_cache
)

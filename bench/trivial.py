"""BentoML's own ceiling: the same service setup (the router's `service_options`, FastAPI on BentoML, same request
model) answering a constant. `python -m bench` measures it as the reference for the warm-cache path. It writes no
access log: `service_options` turns BentoML's off, and the router's own (router.logs.AccessLog) is the router's."""

from __future__ import annotations

import bentoml
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from router.api import request_models, service_options, use_request_timeout
from router.config import Settings
from router.metrics import exposition

settings = Settings()
ClassifyRequest, _ = request_models(settings.max_text_chars, settings.max_batch_texts)
http = FastAPI()
use_request_timeout()  # as the router does


@http.post("/v1/query-classify")
async def classify(body: ClassifyRequest) -> dict[str, object]:  # type: ignore[valid-type]
    return {"label": "1", "confidence": 1.0}


@http.get("/health/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@http.get("/metrics")
async def metrics() -> Response:
    """Like the router's own /metrics (BentoML's are off in both); the benchmark reads it between scenarios."""
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


@bentoml.service(name="trivial", **service_options(settings, ["/v1/query-classify", "/health/ready", "/metrics"]))
@bentoml.asgi_app(http, path="/")
class Trivial:
    """Module-level routes, like the router's (service.the_service says why)."""

"""BentoML's own ceiling: the same service setup (one worker, FastAPI on BentoML, same request model) answering a
constant. `python -m bench` measures it as the reference for the warm-cache path."""

from __future__ import annotations

import bentoml
from fastapi import FastAPI

from router.api import request_models
from router.config import Settings

settings = Settings()
ClassifyRequest, _ = request_models(settings.max_text_chars, settings.max_batch_texts)
http = FastAPI()


@bentoml.service(name="trivial", workers=1, threads=1, traffic={"timeout": 30})
@bentoml.asgi_app(http, path="/")
class Trivial:
    @http.post("/v1/query-classify")
    async def classify(self, body: ClassifyRequest) -> dict[str, object]:  # type: ignore[valid-type]
        return {"label": "1", "confidence": 1.0}

    @http.get("/health/ready")
    async def ready(self) -> dict[str, str]:
        return {"status": "ready"}

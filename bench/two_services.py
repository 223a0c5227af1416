"""The rejected design, kept to re-measure it: a gateway service that calls a separate model service through
`bentoml.depends()`. `bentoml serve bench.two_services:Gateway` (README § Architecture has the numbers)."""

from __future__ import annotations

from typing import Any

import bentoml

from router.config import Settings
from router.inference import Classifier
from router.model import resolve_model
from router.text import normalize

settings = Settings()


@bentoml.service(workers=1, threads=1)
class Model:
    def __init__(self) -> None:
        self.classifier = Classifier.load(resolve_model(settings), settings)
        self.classifier.warm_up()

    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": p.label, "confidence": p.confidence} for p in self.classifier.predict(texts)]


@bentoml.service(workers=1)
class Gateway:
    model = bentoml.depends(Model)

    @bentoml.api(route="/v1/query-classify")
    async def classify(self, text: str) -> dict[str, Any]:
        [raw] = await self.model.to_async.predict(texts=[normalize(text)])
        return dict(raw)

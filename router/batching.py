"""BentoML's adaptive batching, fed in-process.

BentoML batches the concurrent calls of a `@bentoml.api(batchable=True)` method with its `CorkDispatcher`. Reaching
that method from another route of the same service (its self-proxy) or from another service (`bentoml.depends`)
goes through BentoML's aiohttp client, which dropped 7–14 % of calls with `ServerDisconnectedError` under 16
concurrent clients here (BentoML issues #3669, #4238; numbers in README § Architecture). So the HTTP routes hand
their texts to the same dispatcher class directly: the same batching policy (max batch size, latency budget,
503 when the queue cannot meet it), without an HTTP hop, JSON round trip or dropped connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
from bentoml._internal.marshal.dispatcher import CorkDispatcher  # pinned: bentoml==1.4.40

T = TypeVar("T")


class Overloaded(RuntimeError):
    """The batch queue cannot answer within the latency budget: shed the request (HTTP 503)."""


def _overloaded() -> Any:
    raise Overloaded("the model queue cannot meet MAX_LATENCY_MS")


class AdaptiveBatcher(Generic[T]):
    """`await batcher.run(items)`: concurrent calls are merged into one `predict_batch(all_items)` in a thread."""

    def __init__(self, predict_batch: Callable[[list[str]], list[T]], max_batch_size: int, max_latency_ms: int) -> None:
        self.predict_batch = predict_batch
        self.limiter = anyio.CapacityLimiter(1)  # one forward pass at a time; torch uses all cores for it
        dispatcher: CorkDispatcher[list[str], list[T]] = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=_overloaded,
            get_batch_size=len,
            batch_dim=(0, 0),
        )
        self.dispatcher = dispatcher
        self.run: Callable[[list[str]], Awaitable[list[T]]] = dispatcher(self._run_merged)  # type: ignore[assignment]

    async def _run_merged(self, calls: Sequence[list[str]]) -> list[list[T]]:
        merged = [item for call in calls for item in call]
        results = await anyio.to_thread.run_sync(self.predict_batch, merged, limiter=self.limiter)
        out: list[list[T]] = []
        start = 0
        for call in calls:
            out.append(results[start : start + len(call)])
            start += len(call)
        return out

    def shutdown(self) -> None:
        self.dispatcher.shutdown()

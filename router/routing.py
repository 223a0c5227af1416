"""Confidence routing: an unsure fast-path answer goes to the slow path, where a wrong answer costs only money."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# For a model folder without routing.json: the default model's threshold before models shipped their own (chosen on
# cross-validated predictions: 0.4% of slow-path queries sent fast, docs/model-card.md).
FALLBACK_THRESHOLD = 0.99


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's own answer for one text: its top label and that label's softmax probability."""

    label: str
    confidence: float


def route(prediction: Prediction, threshold: float, fast_label: str, slow_label: str) -> str:
    """Routed label: the fast label only when the model is at least `threshold` sure of it."""
    if prediction.label == fast_label and prediction.confidence < threshold:
        return slow_label
    return prediction.label


@dataclass(frozen=True, slots=True)
class Threshold:
    """The routing threshold in force and where it came from (shown by /health/deep and /metrics)."""

    value: float
    source: Literal["setting", "model", "fallback"]


def pick_threshold(configured: float | None, shipped: float | None) -> Threshold:
    """CONFIDENCE_THRESHOLD when set; else the model's own (its routing.json, chosen on its validation predictions,
    because where a model's confidences pile up differs from one training run to the next); else the fallback."""
    if configured is not None:
        return Threshold(configured, "setting")
    if shipped is not None:
        return Threshold(shipped, "model")
    return Threshold(FALLBACK_THRESHOLD, "fallback")

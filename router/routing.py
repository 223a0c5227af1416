"""Confidence routing: an unsure fast-path answer goes to the slow path, where a wrong answer costs only money."""

from __future__ import annotations

from dataclasses import dataclass


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

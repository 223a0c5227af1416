"""Texts in, predictions out: one batched forward pass of a sequence-classification model."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from router.config import Settings
from router.model import ModelSource, load_model, model_identity
from router.routing import Prediction

log = logging.getLogger(__name__)


@dataclass
class Classifier:
    """A loaded model with its tokenizer and label names (from the model's config, never from code)."""

    model: Any
    tokenizer: Any
    labels: dict[int, str]
    max_length: int
    device: str
    identity: str

    @classmethod
    def load(cls, source: ModelSource, settings: Settings) -> Classifier:
        import torch

        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
        model, tokenizer = load_model(source)
        model.to(settings.model_device)
        labels = {int(i): str(name) for i, name in model.config.id2label.items()}
        missing = {settings.fast_label, settings.slow_label} - set(labels.values())
        if missing:
            from router.model import ModelLoadError

            raise ModelLoadError(
                f"model labels {sorted(labels.values())} lack {sorted(missing)} (FAST_LABEL/SLOW_LABEL, id2label)"
            )
        identity = model_identity(source, extra=f"{settings.model_backend}:{settings.max_length}")
        return cls(model, tokenizer, labels, settings.max_length, settings.model_device, identity)

    def predict(self, texts: list[str]) -> list[Prediction]:
        """Softmax top label and probability for each text, padded only to the longest text of the batch."""
        import torch

        if not texts:
            return []
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            probabilities = self.model(**encoded).logits.float().softmax(dim=-1)
        confidences, indices = probabilities.max(dim=-1)
        return [
            Prediction(label=self.labels[int(i)], confidence=float(c))
            for i, c in zip(indices.tolist(), confidences.tolist(), strict=True)
        ]

    def warm_up(self) -> None:
        """Run the first forward passes before traffic: they pay one-off allocation and kernel selection."""
        for size in (1, 8):
            self.predict(["warm-up query for the router"] * size)

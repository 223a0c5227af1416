"""Texts in, predictions out: batched forward passes of a sequence-classification model, behind one interface.

Backends (MODEL_BACKEND): `onnx-int8` (default; the model exported to ONNX, weights quantized to int8 per channel,
run by ONNX Runtime; the graph is kept in ONNX_CACHE_DIR for the next start, see `router.onnx_graph`), `onnx` (the
same in fp32), `torch-int8` (PyTorch dynamic int8) and `torch` (eager fp32, the only one for cuda/mps). ONNX Runtime
runs a whole forward pass in C++ without the GIL, so the event loop serving HTTP in the same process does not slow
inference down; docs/performance.md has the measurements.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.config import Settings
from router.model import ModelSource, load_model, model_identity
from router.onnx_graph import load_onnx_model
from router.routing import Prediction

log = logging.getLogger(__name__)


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantization of every Linear layer: weights int8 per output channel, activations per batch.

    Per-channel scales keep the confidences close to fp32 (per-tensor moved one summarization query from 0.94 to 0.60,
    across the routing threshold); test accuracy is unchanged and CPU throughput 1.6x (docs/performance.md).
    """
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})


def torch_forward(model: Any, device: str) -> Callable[[Any], np.ndarray]:
    import torch

    def forward(encoded: Any) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(model(**encoded.to(device)).logits.float().cpu().numpy())

    return forward


def onnx_forward(session: Any, names: list[str]) -> Callable[[Any], np.ndarray]:
    def forward(encoded: Any) -> np.ndarray:
        return np.asarray(session.run(["logits"], {n: encoded[n] for n in names})[0])

    return forward


@dataclass
class Classifier:
    """A loaded model with its tokenizer and label names (from the model's config, never from code)."""

    forward: Callable[[Any], np.ndarray]
    tokenizer: Any
    labels: dict[int, str]
    max_length: int
    tensors: str  # what the tokenizer returns for `forward`: "pt" (torch) or "np" (ONNX Runtime)
    identity: str
    group_size: int = 8  # with the length rule, 8/16/32 measured within 5 % (docs/performance.md)
    # Forward passes run side by side (MODEL_WORKERS) and share the tokenizer. Fast tokenizers raised "Already
    # borrowed" when called from two threads (huggingface/transformers#47085; not reproduced with the pinned
    # version in 4,000 calls from 16 threads); the lock keeps any tokenizer safe at no measured cost.
    tokenize_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, source: ModelSource, settings: Settings) -> Classifier:
        _, threads = settings.parallelism()
        backend = settings.model_backend
        if settings.model_device != "cpu" and backend != "torch":
            log.warning("MODEL_BACKEND=%s is CPU-only; running torch fp32 on %s", backend, settings.model_device)
            backend = "torch"
        identity = model_identity(source, extra=f"{backend}:{settings.max_length}")
        if backend.startswith("onnx"):
            onnx = load_onnx_model(source, identity, backend == "onnx-int8", threads, settings.onnx_cache_dir)
            forward, tokenizer, labels, tensors = (
                onnx_forward(onnx.session, onnx.input_names),
                onnx.tokenizer,
                onnx.labels,
                "np",
            )
        else:
            import torch

            torch.set_num_threads(threads)
            model, tokenizer = load_model(source)
            model.to(settings.model_device)
            if backend == "torch-int8":
                model = quantize_int8(model)
            forward, tensors = torch_forward(model, settings.model_device), "pt"
            labels = {int(i): str(name) for i, name in model.config.id2label.items()}
        missing = {settings.fast_label, settings.slow_label} - set(labels.values())
        if missing:
            from router.model import ModelLoadError

            raise ModelLoadError(
                f"model labels {sorted(labels.values())} lack {sorted(missing)} (FAST_LABEL/SLOW_LABEL, id2label)"
            )
        return cls(forward, tokenizer, labels, settings.max_length, tensors, identity)

    def predict(self, texts: list[str]) -> list[Prediction]:
        """Softmax top label and probability for each text.

        Texts are sorted by length and cut into groups of similar length (at most `group_size`, and a text longer
        than twice the group's first starts a new group); each group is padded only to its own longest text. A batch
        mixing 15-token questions with 128-token passages would otherwise pay 128 tokens for every text: batches of
        8 random dolly texts ran at 136 queries/s padded together, below the 312 of single texts.
        """
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        groups: list[list[int]] = []
        for i in order:
            if not groups or len(groups[-1]) == self.group_size or len(texts[i]) > 2 * len(texts[groups[-1][0]]) + 20:
                groups.append([])
            groups[-1].append(i)
        results: list[Prediction | None] = [None] * len(texts)
        for group in groups:
            for i, prediction in zip(group, self._forward([texts[i] for i in group]), strict=True):
                results[i] = prediction
        return [r for r in results if r is not None]

    def _forward(self, texts: list[str]) -> list[Prediction]:
        with self.tokenize_lock:
            encoded = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors=self.tensors
            )
        logits = self.forward(encoded).astype(np.float64)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = exp / exp.sum(axis=-1, keepdims=True)
        return [
            Prediction(label=self.labels[int(i)], confidence=float(p[i]))
            for i, p in zip(probabilities.argmax(axis=-1), probabilities, strict=True)
        ]

    def warm_up(self) -> None:
        """Run the first forward passes before traffic: they pay one-off allocation and kernel selection."""
        for size in (1, 8):
            self.predict(["warm-up query for the router"] * size)

"""Texts in, predictions out: batched forward passes of a sequence-classification model, behind one interface.

Backends (MODEL_BACKEND): `onnx-int8` (default; the model exported to ONNX at load, weights quantized to int8 per
channel, run by ONNX Runtime), `onnx` (the same in fp32), `torch-int8` (PyTorch dynamic int8) and `torch` (eager fp32,
the only one for cuda/mps). ONNX Runtime runs a whole forward pass in C++ without the GIL, so the event loop serving
HTTP in the same process does not slow inference down; README § Performance has the measurements.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from router.config import Settings
from router.model import ModelSource, load_model, model_identity
from router.routing import Prediction

log = logging.getLogger(__name__)


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantization of every Linear layer: weights int8 per output channel, activations per batch.

    Per-channel scales keep the confidences close to fp32 (per-tensor moved one summarization query from 0.94 to 0.60,
    across the routing threshold); test accuracy is unchanged and CPU throughput 1.6x (README § Performance).
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


def onnx_forward(model: Any, tokenizer: Any, threads: int, int8: bool) -> Callable[[Any], np.ndarray]:
    """Export to ONNX (dynamic batch and sequence axes), optionally quantize, and open an ONNX Runtime session."""
    import inspect

    import onnxruntime as ort
    import torch

    # Graph inputs follow forward()'s parameter order, and input_names are given positionally: keep that order.
    names = [p for p in inspect.signature(model.forward).parameters if p in tokenizer.model_input_names]
    with tempfile.TemporaryDirectory(prefix="query-router-onnx-") as tmp:  # the session keeps the model in memory
        folder = Path(tmp)
        example = tokenizer(["warm-up query", "a second, longer warm-up query"], padding=True, return_tensors="pt")
        axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
        torch.onnx.export(
            model, (), str(folder / "model.onnx"), kwargs={n: example[n] for n in names}, input_names=names,
            output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
        path = folder / "model.onnx"
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(path, folder / "model.int8.onnx", weight_type=QuantType.QInt8, per_channel=True)
            path = folder / "model.int8.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal CPU
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

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
    group_size: int = 8  # with the length rule, 8/16/32 measured within 5 % (README § Performance)
    # Forward passes run side by side (MODEL_WORKERS) and share the tokenizer. Fast tokenizers raised "Already
    # borrowed" when called from two threads (huggingface/transformers#47085; not reproduced with the pinned
    # version in 4,000 calls from 16 threads); the lock keeps any tokenizer safe at no measured cost.
    tokenize_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, source: ModelSource, settings: Settings) -> Classifier:
        import torch

        _, threads = settings.parallelism()
        torch.set_num_threads(threads)
        model, tokenizer = load_model(source)
        backend = settings.model_backend
        if settings.model_device != "cpu" and backend != "torch":
            log.warning("MODEL_BACKEND=%s is CPU-only; running torch fp32 on %s", backend, settings.model_device)
            backend = "torch"
        if backend.startswith("onnx"):
            forward, tensors = onnx_forward(model, tokenizer, threads, int8=backend == "onnx-int8"), "np"
        else:
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
        identity = model_identity(source, extra=f"{backend}:{settings.max_length}")
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

"""Every MODEL_BACKEND serves the same model: the same labels, and fp32 ONNX matches eager torch exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.config import Settings
from router.inference import Classifier
from router.model import ModelSource, resolve_model

QUERIES = [
    "Classify each of the following as a mammal or a bird: dog, eagle, whale, sparrow",
    "Summarize the following paragraph.\n\nThe Amazon is the largest rainforest on Earth. It spans nine "
    "countries and is home to millions of species of insects, plants, birds and other forms of life.",
    "Write a short poem about autumn leaves falling.",
    "Why do people like to travel?",
    "short",
]


def predictions(source: ModelSource, backend: str) -> list[tuple[str, float]]:
    classifier = Classifier.load(source, Settings(model_backend=backend))  # type: ignore[arg-type]
    return [(p.label, p.confidence) for p in classifier.predict(QUERIES)]


@pytest.fixture(scope="module")
def embedded() -> ModelSource:
    return resolve_model(Settings())


def test_backends_agree_on_the_embedded_model(embedded: ModelSource) -> None:
    reference = predictions(embedded, "torch")
    assert [label for label, _ in reference] == ["0", "0", "1", "1", reference[4][0]]
    onnx = predictions(embedded, "onnx")
    assert onnx == [(label, pytest.approx(c, abs=1e-4)) for label, c in reference]
    for backend in ("onnx-int8", "torch-int8"):
        quantized = predictions(embedded, backend)
        assert [label for label, _ in quantized[:4]] == ["0", "0", "1", "1"], backend
        assert all(abs(q - c) < 0.1 for (_, q), (_, c) in zip(quantized, reference, strict=True)), backend


def test_onnx_export_handles_a_distilbert_without_token_type_ids(fast_model: Path) -> None:
    source = ModelSource(path=fast_model, origin="path", name="tiny")
    for label, confidence in predictions(source, "onnx-int8"):
        assert label == "0"
        assert confidence == pytest.approx(0.9975, abs=1e-3)  # softmax([3, -3]): the head ignores the text


def test_identity_differs_per_backend(embedded: ModelSource) -> None:
    a = Classifier.load(embedded, Settings(model_backend="torch")).identity
    b = Classifier.load(embedded, Settings(model_backend="onnx-int8")).identity
    assert a != b  # int8 answers differ slightly, so they never share cache entries


def test_forward_passes_side_by_side_give_the_answers_of_one_at_a_time(embedded: ModelSource) -> None:
    """MODEL_WORKERS > 1 runs `predict` from several threads on one classifier (one tokenizer, one session)."""
    from concurrent.futures import ThreadPoolExecutor

    classifier = Classifier.load(embedded, Settings(model_backend="onnx-int8", model_workers=2, torch_threads=1))
    batches = [QUERIES[i:] + QUERIES[:i] for i in range(len(QUERIES))] * 8
    alone = [classifier.predict(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(classifier.predict, batches))
    assert together == alone


def test_the_exported_graph_computes_attention_with_plain_ops(embedded: ModelSource, tmp_path: Path) -> None:
    """Eager attention, not PyTorch's SDPA: its export adds an IsNaN/Where pass over every layer's attention
    weights, 13 % of a forward pass (docs/performance.md)."""
    from collections import Counter

    import onnx

    Classifier.load(embedded, Settings(model_backend="onnx", onnx_cache_dir=str(tmp_path)))
    (entry,) = tmp_path.iterdir()
    ops = Counter(node.op_type for node in onnx.load(entry / "model.onnx").graph.node)
    layers = json.loads((embedded.path / "config.json").read_text())["num_hidden_layers"]
    assert ops["Softmax"] == layers  # one per transformer layer
    assert ops["IsNaN"] == 0

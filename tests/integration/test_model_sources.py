"""Model resolution for real: MODEL_PATH, the Hub (a local stand-in on loopback) and the embedded default."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.config import Settings
from router.model import EMBEDDED_DIR, ROUTING_FILE, ModelLoadError, resolve_model
from tests.hub_standin import running_hub, served_from_hub

pytestmark = pytest.mark.integration


def test_explicit_model_path_without_a_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="holds no model"):
        resolve_model(Settings(model_path=str(tmp_path)))


def test_service_serves_a_hub_model(server_factory: Callable[..., Any], fast_model: Path, tmp_path: Path) -> None:
    with running_hub() as (hub, endpoint):
        commit = hub.add_folder("acme/router-tiny", fast_model)
        env = served_from_hub(endpoint, "acme/router-tiny", tmp_path / "cache")
        with server_factory(env) as server:
            assert server.classify("Summarize: rivers flow to the sea.").json()["label"] == "0"
            model = server.deep()["model"]
            assert model["source"] == "hub" and model["name"] == "acme/router-tiny"  # type: ignore[index]
            assert model["revision"] == commit  # type: ignore[index]  # the snapshot's commit, for the logs
        assert any(r.startswith("GET /api/models/acme/router-tiny/revision/main") for r in hub.requests)


def test_service_with_a_wrong_hub_id_stays_not_ready(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    with running_hub() as (_, endpoint):
        env = served_from_hub(endpoint, "acme/does-not-exist", tmp_path / "cache")
        with server_factory(env, ready=False) as server:
            ready = server.wait_until_loaded()
            assert ready.status_code == 503
            assert "HF_MODEL_ID=acme/does-not-exist" in ready.json()["error"]


def test_embedded_default_routes_obvious_queries(server_factory: Callable[..., Any]) -> None:
    """No model configuration: the packaged backbone plus the shipped router weights, offline.

    The threshold is lowered to 0.5 so `label` is the model's own answer: at the default 0.99 a summary of a pasted
    passage (P(fast) 0.88-0.97) is routed slow on purpose (docs/model-card.md); the tiny models test routing.
    """
    trained = (EMBEDDED_DIR / "config.json").is_file()
    with server_factory({"CONFIDENCE_THRESHOLD": "0.5"}) as server:
        model = server.deep()["model"]
        assert model["source"] == "embedded"  # type: ignore[index]
        assert model["trained"] is trained  # type: ignore[index]
        if not trained:
            assert "UNTRAINED" in server.log()
            pytest.skip("router/default_model holds no trained weights yet")
        fast = [
            "Classify each of the following as a mammal or a bird: dog, eagle, whale, sparrow",
            "Summarize the following paragraph.\n\nThe Amazon is the largest rainforest on Earth. It spans nine "
            "countries and is home to millions of species of insects, plants, birds and other forms of life.",
        ]
        slow = ["Write a short poem about autumn leaves falling.", "Why do people like to travel?"]
        for text in fast:
            assert server.classify(text).json()["label"] == "0", text
        for text in slow:
            assert server.classify(text).json()["label"] == "1", text


def test_a_model_folder_brings_its_own_threshold(
    server_factory: Callable[..., Any], fast_model: Path, tmp_path: Path
) -> None:
    """fast_model answers "0" at 0.99753: fast at the fallback 0.99, slow at the 0.999 its routing.json ships."""
    model = shutil.copytree(fast_model, tmp_path / "model")
    (model / ROUTING_FILE).write_text(json.dumps({"confidence_threshold": 0.999}))
    with server_factory({"MODEL_PATH": str(model)}) as server:
        assert server.classify("Is a tomato a fruit?").json()["label"] == "1"
        assert server.deep()["routing"]["source"] == "model"  # type: ignore[index]
        assert server.metric("router_confidence_threshold", source="model") == 0.999
    with server_factory({"MODEL_PATH": str(model), "CONFIDENCE_THRESHOLD": "0.99"}) as server:
        assert server.classify("Is a tomato a fruit?").json()["label"] == "0"  # the operator's setting wins
        assert server.deep()["routing"] == {  # type: ignore[index]
            "confidence_threshold": 0.99,
            "source": "setting",
            "fast_label": "0",
            "slow_label": "1",
        }


def test_a_broken_routing_json_keeps_the_service_not_ready(
    server_factory: Callable[..., Any], fast_model: Path, tmp_path: Path
) -> None:
    """Serving a model at another threshold than the one it shipped with would be a silent misroute."""
    model = shutil.copytree(fast_model, tmp_path / "model")
    (model / ROUTING_FILE).write_text('{"confidence_threshold": "high"}')
    with server_factory({"MODEL_PATH": str(model)}, ready=False) as server:
        ready = server.wait_until_loaded()
        assert ready.status_code == 503 and ROUTING_FILE in ready.json()["error"]

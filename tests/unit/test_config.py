"""Settings read the environment and fail fast, naming the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.config import Settings


@pytest.fixture
def no_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every variable Settings reads, so a developer's shell cannot change the defaults under test."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.usefixtures("no_settings_env")
def test_defaults_match_the_documented_values() -> None:
    s = Settings()
    assert (s.cache_l1_size, s.cache_l1_ttl_sec, s.cache_l2_ttl_sec) == (10000, 300, 3600)
    assert s.confidence_threshold is None  # the model's own (routing.json), else 0.99: router.routing
    assert s.redis_url is None and s.model_path is None
    assert (s.fast_label, s.slow_label) == ("0", "1")
    assert s.onnx_cache_dir == "~/.cache/query-router/onnx"


def test_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIDENCE_THRESHOLD", "0.85")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    s = Settings()
    assert s.confidence_threshold == 0.85
    assert s.redis_url == "redis://127.0.0.1:6379/3"
    assert s.max_batch_size == 32
    assert s.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONFIDENCE_THRESHOLD", "1.5"),
        ("CONFIDENCE_THRESHOLD", "high"),
        ("CACHE_L1_SIZE", "-1"),
        ("MODEL_DEVICE", "tpu"),
        ("MAX_BATCH_SIZE", "1"),
        ("LOG_FORMAT", "xml"),
        ("REDIS_TIMEOUT_MS", "0"),
    ],
)
def test_invalid_values_fail_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    assert name.lower() in str(error.value)


def test_fast_and_slow_labels_must_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOW_LABEL", "0")
    with pytest.raises(ValidationError, match="FAST_LABEL and SLOW_LABEL must differ"):
        Settings()


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else str(field.default)
        row = f"| `{name.upper()}` | " + (f"`{default}`" if default else "")
        assert row in readme, f"README's configuration table lacks {name.upper()} with default {default!r}"


@pytest.mark.usefixtures("no_settings_env")
def test_each_cpu_gets_a_worker_process_with_one_single_threaded_forward_pass_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("router.config.cpu_count", lambda: 2)
    assert (Settings().processes(), Settings().parallelism(), Settings().forward_passes()) == (2, (1, 1), 2)
    one = Settings(service_workers=1)  # one process on both CPUs: two passes side by side, one thread each
    assert (one.processes(), one.parallelism(), one.forward_passes()) == (1, (2, 1), 2)
    assert Settings(service_workers=1, model_workers=1).parallelism() == (1, 2)
    assert Settings(model_workers=1, torch_threads=3).parallelism() == (1, 3)
    assert Settings(model_workers=3).forward_passes() == 6
    gpu = Settings(model_device="cuda")
    assert (gpu.processes(), gpu.parallelism()) == (1, (1, 2))
    monkeypatch.setattr("router.config.cpu_count", lambda: 32)
    assert (Settings().processes(), Settings().parallelism()) == (8, (4, 1))
    monkeypatch.setattr("router.config.cpu_count", lambda: 3)
    assert (Settings().processes(), Settings().parallelism()) == (3, (1, 1))
    assert Settings(service_workers=2).parallelism() == (1, 1)  # 3 // 2: one CPU each, none shared


def test_cpu_count_is_what_the_process_may_use() -> None:
    import os

    from router.config import cpu_count

    assert 1 <= cpu_count() <= len(os.sched_getaffinity(0))
